"""``GPTQ``: GPTQ at the end of ``fit`` (a thin :class:`PostTrainingQuantization`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.callbacks.ptq import PostTrainingQuantization
from lightning_quant.methods.rotation import Rotation
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE

__all__ = ["GPTQ"]


class GPTQ(PostTrainingQuantization):
    """Run GPTQ (:mod:`lightning_quant.algorithms.gptq`) on the trained model and swap in packed layers.

    Example::

        trainer = Trainer(callbacks=[GPTQ(QuantSpec(bits=4, group_size=128), num_samples=128)])
        trainer.fit(model, datamodule=dm)   # the model holds PackedLinear layers afterwards

    Per-layer losses are logged as ``gptq/<layer>/gptq_loss``. See :class:`PostTrainingQuantization`
    for the arguments; ``config`` is a :class:`~lightning_quant.algorithms.gptq.GPTQConfig`. A config with
    ``awq=AWQConfig(...)`` runs ``method="awq+gptq"`` (AWQ scales folded first, then GPTQ)::

        GPTQ(QuantSpec(4, 64, symmetric=False), config=GPTQConfig(awq=AWQConfig()))

    ``rotation=Rotation(kind="hadamard")`` rotates the residual stream offline first (QuaRot / SpinQuant R1,
    :mod:`lightning_quant.methods.rotation`; float outputs unchanged)::

        GPTQ(QuantSpec(4, 64, symmetric=False), rotation=Rotation(kind="hadamard", seed=0))
    """

    def __init__(self, spec: QuantSpec | None = None, config: GPTQConfig | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                 num_samples: int = 128, dataloader: Iterable | None = None, when: str = "fit_end",
                 export_on_fit_end: dict | None = None, *, model: str | None = None, lora: str = "merged",
                 rotation: Rotation | None = None) -> None:
        config = config if config is not None else GPTQConfig()
        method = "awq+gptq" if isinstance(config, GPTQConfig) and config.awq is not None else "gptq"
        super().__init__(spec if spec is not None else QuantSpec(), method, config,
                         include=include, exclude=exclude, num_samples=num_samples, dataloader=dataloader, when=when,
                         export_on_fit_end=export_on_fit_end, model=model, lora=lora, rotation=rotation)
