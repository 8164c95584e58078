"""An accuracy target ("ppl:1.5" or "kl:0.02"), shared by --accuracy-budget and --bisect: which metric, what
bound, and whether a measurement meets it. Measurements are dicts with the keys of verify.pair_metrics."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import PipelineError

METRICS = {"ppl": "perplexity_delta_percent", "kl": "kl_mean"}
UNITS = {"ppl": "% perplexity", "kl": "nats mean KL"}
PERPLEXITY_BOUND = "perplexity_delta_bound_percent"  # the accuracy budget's upper bound of the perplexity delta


@dataclass(frozen=True)
class Target:
    metric: str  # "ppl": perplexity delta in percent of the reference; "kl": mean next-token KL in nats
    value: float

    @classmethod
    def parse(cls, text: str, option: str) -> Target:
        """'ppl:<percent>', 'kl:<nats>', or a bare number meaning a perplexity percentage."""
        metric, _, value = text.rpartition(":")
        metric = metric or "ppl"
        try:
            number = float(value)
        except ValueError:
            number = None
        if metric not in METRICS or number is None or not number > 0:
            raise PipelineError(f"{option} '{text}' is not a target: write ppl:<percent> (e.g. ppl:1.5, or just 1.5) "
                                "or kl:<nats> (e.g. kl:0.02), a positive number")
        return cls(metric, number)

    def __str__(self) -> str:
        return f"{self.metric}:{self.value:g}"

    def of(self, measured: dict) -> float:
        return measured[METRICS[self.metric]]

    def met(self, measured: dict, judged: str | None = None) -> bool:
        """Within the target: the target's metric, or the `judged` key of `measured` that stands for it (the
        accuracy budget holds a perplexity target to its upper bound)."""
        return (measured[judged] if judged else self.of(measured)) <= self.value

    def describe(self, value: float) -> str:
        return f"{value:+.3f}{UNITS[self.metric]}" if self.metric == "ppl" else f"{value:.4f} {UNITS[self.metric]}"
