"""Synthetic but realistic signals, for ``argo-signals demo`` and ``argo-signals bench``."""
from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, Iterator, Optional

SYMBOLS = {"AAPL": 190.0, "MSFT": 410.0, "NVDA": 120.0, "TSLA": 240.0, "SPY": 520.0,
           "AMZN": 180.0, "BTC-USD": 64_000.0, "ETH-USD": 3_100.0, "SOL-USD": 150.0}
STRATEGIES = ("momentum", "mean_reversion", "breakout", "weighted_consensus_v6")
REGIMES = ("bull", "bear", "chop", None)
# The demo's signals carry this data_source and simulated timestamps (a trading session):
# the report leaves them out of time to durable, which their own timestamps cannot tell.
SIMULATED_SOURCE = "demo"

SESSION = timedelta(hours=6, minutes=30)   # a trading day's regular session


def session_time(position: int, count: int, end: datetime, length: timedelta = SESSION) -> datetime:
    """The simulated time of signal ``position`` of ``count``: evenly over the ``length``
    before ``end`` (so that the report's signal-time axis spans a session, not the run)."""
    return end - length + length * (position / max(1, count))


def signals(seed: int = 0) -> Iterator[Dict[str, Any]]:
    """An endless stream of plausible signals: prices walk, actions follow the walk."""
    rng = random.Random(seed)
    prices = dict(SYMBOLS)
    names = list(prices)
    while True:
        sym = rng.choice(names)
        move = rng.gauss(0, 0.004)
        prices[sym] = max(0.01, prices[sym] * (1 + move))
        price = round(prices[sym], 2)
        roll = rng.random()
        action = "NEUTRAL" if roll < 0.1 else ("BUY" if move > 0 else "SELL")
        conf = round(min(100.0, max(0.0, rng.gauss(72, 12))), 1)
        up = action != "SELL"
        sig: Dict[str, Any] = {
            "symbol": sym, "action": action, "entry_price": price, "confidence": conf,
            "strategy": rng.choice(STRATEGIES), "regime": rng.choice(REGIMES),
            "data_source": SIMULATED_SOURCE,
        }
        if action != "NEUTRAL":
            sig["target_price"] = round(price * (1.03 if up else 0.97), 2)
            sig["stop_price"] = round(price * (0.98 if up else 1.02), 2)
            sig["reasoning"] = f"{sig['strategy']} sees a {abs(move) * 100:.2f}% move on {sym}"
        yield sig


# Each strategy's edge on top of what its confidence promises (so the P/L curves part ways).
EDGE = {"momentum": 0.04, "mean_reversion": 0.0, "breakout": -0.06, "weighted_consensus_v6": 0.08}


def win_probability(confidence: float, strategy: str) -> float:
    """Chance that a signal ends as a win: rises with confidence, 0.5 at 50, 0.74 at 90."""
    return min(0.95, max(0.05, 0.2 + 0.6 * confidence / 100.0 + EDGE.get(strategy, 0.0)))


def outcome_picker(share: float = 0.6, seed: int = 0) -> Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """A function that closes about ``share`` of the BUY/SELL signals it is shown.

    It returns the fields for ``update_signal()``, or None to leave the signal open: a win takes
    between +0.5 % and the +3 % target, a loss between -0.5 % and the -2 % stop; the exit
    price follows the side.  Deterministic for a given seed and sequence of signals."""
    rng = random.Random(seed)

    def pick(sig: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if sig["action"] == "NEUTRAL" or rng.random() >= share:
            return None
        win = rng.random() < win_probability(sig["confidence"], sig.get("strategy", ""))
        pnl = round(rng.uniform(0.5, 3.0) if win else -rng.uniform(0.5, 2.0), 3)
        side = 1.0 if sig["action"] == "BUY" else -1.0
        exit_price = round(sig["entry_price"] * (1 + side * pnl / 100.0), 2)
        return {"outcome": "win" if win else "loss", "exit_price": max(0.01, exit_price), "profit_loss_pct": pnl}
    return pick
