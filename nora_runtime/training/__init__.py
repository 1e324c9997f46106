"""Training NoRA and NoRA++ adapters (`nora-train`, `nora-inspect`).

    data.py          JSONL records -> token examples with loss masks; split; collate
    lora.py          LoRA on linear layers (the "++")
    nora.py          NoraModel: a converted, frozen transformers model with its adapter parts
    loop.py          fit(): the optimizer loop (accumulation, bf16 autocast, checkpoints,
                     resume, early stopping)
    trainer.py       train(TrainConfig): model + data + output directory
    cli.py           nora-train
    inspect_adapter.py  nora-inspect
    plots.py         loss curve and activation curves (matplotlib, lazily)
    demo_task.py     a task for the tiny test model that NoRA alone learns
"""

from nora_runtime.training.loop import LoopSettings, fit
from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings
from nora_runtime.training.trainer import TrainConfig, TrainResult, train

__all__ = ["LoopSettings", "LoraSettings", "NoraModel", "NoraSettings", "TrainConfig",
           "TrainResult", "fit", "train"]
