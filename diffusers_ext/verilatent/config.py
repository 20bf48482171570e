"""The one validated configuration of VeriLatent (every constant of ``methods.md`` §3.4 lives here).

The dataclass defaults are a search budget of 1: a :class:`VeriLatentConfig` with no arguments reproduces the plain
pipeline exactly (one candidate, seeded like the pipeline, no early stop). The method as specified is one call away::

    from diffusers_ext.verilatent import VeriLatentConfig
    VeriLatentConfig()                        # budget 1: the unwrapped pipeline, bit for bit
    VeriLatentConfig.adaptive()               # N0 = 4 candidates, more rounds of 4 for hard edits up to 12, k = 2
    VeriLatentConfig.fixed(8)                 # 8 candidates, one round, finish the best
    VeriLatentConfig.adaptive(k=3, n_max=16)  # any field can be overridden

Every constant is an EditSteer design choice (methods.md §3.4 "Proposed design"), never the paper's number. k,
lam, mu, the activation map, N_max and the easy thresholds were chosen on the toy world's *train* split (192 cases,
16 candidates each) with ``python -m diffusers_ext.verilatent.calibrate``; re-calibrate ``tau_easy`` for another
model (the score's magnitude term is in units of the source latent's norm, so it transfers better than raw values).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import EditSteerConfigError

ACTIVATIONS = ("latent", "attention", "mix")
#: ``tau_easy`` when left to None, per activation map actually used: the median best round-one score on the toy
#: editor's train split (k = 2, lam = mu = 1), i.e. about half of the edits are judged easy after round one.
TAU_EASY_DEFAULT = {"mix": -0.2, "latent": 0.25, "attention": -0.35}
NORMALISATIONS = ("max", "softmax")
REGIONS = ("consensus", "global")
CONSENSUS = ("contrast", "mean")


@dataclass(frozen=True)
class VeriLatentConfig:
    """How many initial noises to try, when to judge them, how to score them and when to spend more.

    Budget
        ``n0``: candidates of the first round (candidate ``j`` uses seed ``seed + j``). ``n_max``: the most
        candidates of an adaptive search (``None``: equal to ``n0``, i.e. a fixed budget of one round).
        ``round_size``: candidates drawn by each further round. ``top_m``: finalists continued to the last step
        (the best-scored first). ``k``: early steps every candidate runs before it is judged (1 <= k < T).
        ``rollout_batch``: the most candidates denoised in one batch (``None``: a whole round at once); lower it to
        bound memory on large models, the results do not change (up to float rounding of batched kernels).

    Editing activation map (over target latent tokens)
        ``activation``: ``"latent"`` (A_p = ||x0_hat[p] - z_src[p]||_2 over channels), ``"attention"`` (attention
        of instruction tokens to target tokens, captured during the k early steps at no extra NFE) or ``"mix"``
        (``(1 - attention_weight) * latent + attention_weight * attention`` after normalisation; the latent map
        alone where no attention is captured, e.g. at sampler level).
        ``attention_layers``: indices of the double-stream blocks whose attention is averaged (``None``: all).
        ``normalise``: ``"max"`` (A / max_p A) or ``"softmax"`` (exp((A - max_p A) / (temperature * max_p A)), i.e.
        a softmax over tokens at a temperature relative to the peak, rescaled to max 1: it sharpens the map; both
        give maps in [0, 1] with max 1, see :func:`.core.normalise_map`).

    Expected region R
        ``region``: ``"consensus"`` (the candidates' normalised maps averaged; ``consensus="contrast"`` weighs each
        by 1 - its mean, so maps that are high everywhere, i.e. leaks and no-edit noise, vote little, ``"mean"``
        weighs them equally; with ``leave_one_out`` a candidate does not vote on its own region) or ``"global"``
        (R = 1: score the edit magnitude only). A user mask, when
        given to the search, replaces both. ``global_coverage``: a consensus whose mean exceeds it is treated as a
        global edit (R = 1); ``None`` disables the switch.

    Score (methods.md §3.4 step 5)
        S_j = <Â_j, R>/|R|_1 - lam * <Â_j, 1 - R>/|1 - R|_1 + mu * log(eps + <A_j, R>/|R|_1 / s), where s is the
        source latent's mean token norm (so the score does not depend on the latent space's units).

    Difficulty and adaptive budget (step 6)
        After every round the edit is "easy" when the best score reaches ``tau_easy`` (None: the calibrated
        default of the map in use, :data:`TAU_EASY_DEFAULT`), the best beats the median
        candidate by ``tau_margin`` and the candidates' maps agree with their consensus (mean cosine) at least
        ``tau_agreement``; an easy edit (or a search at ``n_max``) stops and finishes its ``top_m`` best.

        ``tau_margin`` and ``tau_agreement`` are **off by default**: at 0 they can never make an edit hard, since
        the top-1 minus median gap is >= 0 and the cosine of two non-negative maps is >= 0. So by default "hard"
        means a low best score only, which is the budget rule of methods.md §3.4.6 ("if max S >= tau_easy keep
        top-1 and finish it; else draw further batches"); the section's other two difficulty signals (a small
        top-1 - median gap, a high map dispersion) are opt-in thresholds here. They are reported either way
        (``SearchReport.round_one`` / ``difficulty``: ``margin``, ``agreement``). Set them > 0 only after
        calibrating them for the model (``python -m diffusers_ext.verilatent.calibrate sweep`` replays agreement
        thresholds at quantiles of the recorded values); changing them changes the benchmark numbers.
    """

    n0: int = 1
    n_max: int | None = None
    round_size: int = 4
    top_m: int = 1
    k: int = 2
    rollout_batch: int | None = None

    activation: str = "mix"
    attention_weight: float = 0.5
    attention_layers: tuple[int, ...] | None = None
    normalise: str = "max"
    temperature: float = 0.1

    region: str = "consensus"
    consensus: str = "contrast"
    leave_one_out: bool = True
    global_coverage: float | None = 0.6

    lam: float = 1.0
    mu: float = 1.0
    eps: float = 1e-6

    tau_easy: float | None = None
    tau_margin: float = 0.0
    tau_agreement: float = 0.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> EditSteerConfigError:
            return EditSteerConfigError(f"VeriLatentConfig: {msg}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("n0", "round_size", "top_m", "k"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise bad(f"{name} must be an integer >= 1, got {v!r}" + (
                    " (N < 1: at least one candidate noise is needed)" if name == "n0" else ""))
        if self.n_max is not None and (not is_int(self.n_max) or self.n_max < self.n0):
            raise bad(f"n_max must be an integer >= n0 ({self.n0}) or None, got {self.n_max!r}")
        if self.rollout_batch is not None and (not is_int(self.rollout_batch) or self.rollout_batch < 1):
            raise bad(f"rollout_batch must be an integer >= 1 or None, got {self.rollout_batch!r}")
        if self.top_m > self.n0:
            raise bad(f"top_m ({self.top_m}) cannot exceed the first round's candidates n0 ({self.n0})")
        if self.activation not in ACTIVATIONS:
            raise bad(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.normalise not in NORMALISATIONS:
            raise bad(f"normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")
        if self.region not in REGIONS:
            raise bad(f"region must be one of {REGIONS}, got {self.region!r}")
        if self.consensus not in CONSENSUS:
            raise bad(f"consensus must be one of {CONSENSUS}, got {self.consensus!r}")
        if self.attention_layers is not None:
            layers = tuple(self.attention_layers)
            if not layers or not all(is_int(i) and i >= 0 for i in layers):
                raise bad(f"attention_layers must be a non-empty tuple of block indices >= 0 or None, got "
                          f"{self.attention_layers!r}")
            object.__setattr__(self, "attention_layers", layers)
        finite = {"attention_weight": self.attention_weight, "temperature": self.temperature, "lam": self.lam,
                  "mu": self.mu, "eps": self.eps, "tau_margin": self.tau_margin, "tau_agreement": self.tau_agreement}
        if self.tau_easy is not None:
            finite["tau_easy"] = self.tau_easy
        for name, v in finite.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}")
        if not 0.0 <= self.attention_weight <= 1.0:
            raise bad(f"attention_weight must be in [0, 1], got {self.attention_weight}")
        if self.temperature <= 0 or self.eps <= 0:
            raise bad("temperature and eps must be > 0")
        if self.lam < 0 or self.mu < 0:
            raise bad(f"lam and mu must be >= 0 (they are penalty weights), got lam={self.lam}, mu={self.mu}")
        if self.global_coverage is not None and not (
                isinstance(self.global_coverage, (int, float)) and 0.0 < self.global_coverage <= 1.0):
            raise bad(f"global_coverage must be in (0, 1] or None, got {self.global_coverage!r}")

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def max_candidates(self) -> int:
        return self.n0 if self.n_max is None else self.n_max

    @property
    def is_adaptive(self) -> bool:
        return self.max_candidates > self.n0

    def easy_threshold(self, activation: str | None = None) -> float:
        """``tau_easy``, or its calibrated default for the activation map in use (:data:`TAU_EASY_DEFAULT`)."""
        if self.tau_easy is not None:
            return float(self.tau_easy)
        return TAU_EASY_DEFAULT[activation or self.activation]

    @property
    def budget(self) -> int:
        """The most candidate noises this configuration may try (1 = the plain pipeline)."""
        return self.max_candidates

    def check_steps(self, num_steps: int) -> None:
        """Raise a clear error when ``k`` does not fall inside a schedule of ``num_steps`` steps."""
        if self.budget > 1 and not 1 <= self.k < num_steps:
            raise EditSteerConfigError(
                f"VeriLatentConfig: k={self.k} is outside the schedule of {num_steps} steps; candidates are judged "
                f"after k early steps, so k must be in [1, {num_steps - 1}] (lower k or raise num_inference_steps)")

    def nfe(self, num_steps: int, candidates: int, passes: int = 1) -> int:
        """NFE of a search that tried ``candidates`` noises (methods.md §3.5): (N k + m (T - k)) x passes."""
        if candidates <= 1 and self.budget <= 1:
            return num_steps * passes
        m = min(self.top_m, candidates)
        return (candidates * self.k + m * (num_steps - self.k)) * passes

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["attention_layers"] is not None:
            d["attention_layers"] = list(d["attention_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VeriLatentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EditSteerConfigError(f"VeriLatentConfig: unknown fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("attention_layers") is not None:
            d["attention_layers"] = tuple(d["attention_layers"])
        return cls(**d)

    # ---- presets ---------------------------------------------------------------------------------------------------
    @classmethod
    def adaptive(cls, **overrides) -> "VeriLatentConfig":
        """The adaptive search of methods.md §3.4: N0 = 4, rounds of 4 for hard edits up to N_max = 12, top-1."""
        return cls(**{"n0": 4, "n_max": 12, "round_size": 4, "top_m": 1, **overrides})

    @classmethod
    def fixed(cls, n: int = 8, **overrides) -> "VeriLatentConfig":
        """A fixed budget: ``n`` candidates in one round, judged after k steps, the best finished."""
        return cls(**{"n0": n, "n_max": None, **overrides})

    def replace(self, **changes) -> "VeriLatentConfig":
        return replace(self, **changes)
