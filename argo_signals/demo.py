"""Synthetic but realistic signals, for ``argo-signals demo`` and ``argo-signals bench``."""
from __future__ import annotations

import random
from typing import Any, Dict, Iterator

SYMBOLS = {"AAPL": 190.0, "MSFT": 410.0, "NVDA": 120.0, "TSLA": 240.0, "SPY": 520.0,
           "AMZN": 180.0, "BTC-USD": 64_000.0, "ETH-USD": 3_100.0, "SOL-USD": 150.0}
STRATEGIES = ("momentum", "mean_reversion", "breakout", "weighted_consensus_v6")
REGIMES = ("bull", "bear", "chop", None)


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
            "data_source": "demo",
        }
        if action != "NEUTRAL":
            sig["target_price"] = round(price * (1.03 if up else 0.97), 2)
            sig["stop_price"] = round(price * (0.98 if up else 1.02), 2)
            sig["reasoning"] = f"{sig['strategy']} sees a {abs(move) * 100:.2f}% move on {sym}"
        yield sig
