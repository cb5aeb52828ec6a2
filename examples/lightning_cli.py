"""LightningCLI with lightning-quant recipes.

    python examples/lightning_cli.py fit --config callbacks/qat-w4a8.yaml
    python examples/lightning_cli.py fit --config callbacks/gptq-w4g128.yaml --model.model tiny-llama \\
        --data.tokenizer bytes --trainer.max_steps 5

The model is ``lightning_quant.lit.CausalLM`` (``--model.model smollm2`` by default, any HF directory or
``.gguf`` file, or a tiny test model), the data ``lightning_quant.lit.StdlibText`` (standard-library
source code, held-out files for validation). Every callback of the library is configurable here.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_quant.lit import CausalLM, StdlibText


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(CausalLM, StdlibText, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
