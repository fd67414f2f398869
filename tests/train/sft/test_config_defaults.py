"""The paper's defaults that depend on the method: 10 epochs for LoRA, 5 for full fine-tuning."""
from lora_core.train.sft.config import TrainConfig


def test_epochs_follow_the_method_unless_given():
    assert TrainConfig(method="lora").epochs == 10.0
    assert TrainConfig(method="full").epochs == 5.0
    assert TrainConfig(method="full", epochs=2.0).epochs == 2.0
    restored = TrainConfig.from_dict(TrainConfig(method="full").to_dict())
    assert restored.epochs == 5.0


def test_retain_defaults_read_no_evaluation_item():
    cfg = TrainConfig()
    assert (cfg.retain_data, cfg.retain_targets) == ("diverse", "self")
