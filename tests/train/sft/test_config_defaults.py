"""The paper's defaults that depend on the method: 10 epochs for LoRA, 5 for full fine-tuning."""
from lora_core.train.sft.config import TrainConfig


def test_epochs_follow_the_method_unless_given():
    assert TrainConfig.from_flat(method="lora").optim.epochs == 10.0
    assert TrainConfig.from_flat(method="full").optim.epochs == 5.0
    assert TrainConfig.from_flat(method="full", epochs=2.0).optim.epochs == 2.0
    restored = TrainConfig.from_dict(TrainConfig.from_flat(method="full").to_dict())
    assert restored.optim.epochs == 5.0


def test_retain_defaults_read_no_evaluation_item():
    cfg = TrainConfig()
    assert (cfg.retain.data, cfg.retain.targets) == ("diverse", "self")
