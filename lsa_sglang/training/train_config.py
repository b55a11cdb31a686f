"""Training hyperparameters, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

import dataclasses


class TrainError(ValueError):
    """Training cannot start or resume; the message says why."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 16
    batch_size: int = 32
    lr: float = 1e-3  # query-dependent head weights (weights_proj)
    bias_lr: float = 3e-2  # layer bias, head-weight bias, q bias
    q_lr: float = 1e-4  # query side (wq_a, q_norm, wq_b)
    anchor: float = 1e-2  # L2 towards the initial query side, per element mean
    loss: str = "bce"  # "bce" | "focal"
    pos_weight: float = 2.0
    focal_gamma: float = 2.0
    neg_ratio: float = 3.0
    hard_fraction: float = 0.5
    aux_weight: float = 0.0  # per-layer BCE next to the ensembled one
    rank_weight: float = 1.0  # listwise ranking term (trainer.listwise_loss)
    ensemble: str = "max"
    train_params: str = "all"  # "all" | "head" | "head+norm" | "head+q" (see trainer.TRAINED)
    leak: float = 0.1  # leaky-relu slope while training, annealed to 0 (trainer.leak_at)
    q_bias: bool = True  # add a trainable q bias when the backbone has none (trainer.with_q_bias)
    calibrate: bool = True  # data-driven start: centre the dots, set layer biases (trainer.calibrate)
    calibrate_quantile: float = 0.5
    budget: int = 9  # selector page budget (one chunk per page) for the served metrics
    operating_beta: float = 2.0  # bias shift maximising served F-beta on val (0: off; trainer.tune_operating_point)
    votes: int | None = None  # override the dump's vote threshold
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("bce", "focal"):
            raise TrainError(f"loss must be 'bce' or 'focal', got {self.loss!r}")
        if self.ensemble not in ("max", "mean"):
            raise TrainError(f"ensemble must be 'max' or 'mean', got {self.ensemble!r}")
        if self.train_params not in ("all", "head", "head+norm", "head+q"):
            raise TrainError(f"train_params must be one of all, head, head+norm, head+q; got {self.train_params!r}")
        if not 0.0 <= self.leak < 1.0:
            raise TrainError(f"leak must be in [0, 1), got {self.leak!r}")
        for name, lo in (("epochs", 0), ("batch_size", 1), ("budget", 1)):
            if getattr(self, name) < lo:
                raise TrainError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not 0.0 <= self.hard_fraction <= 1.0 or self.neg_ratio <= 0:
            raise TrainError("hard_fraction must be in [0, 1] and neg_ratio > 0")


__all__ = ["TrainConfig", "TrainError"]
