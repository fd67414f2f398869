"""The HParams entry of each run: one type per setting across arms, so TensorBoard's table can list
a LoRA, a full and a merge run side by side; only finite numbers become metrics."""
import math

from lora_core.train.repro.preset import Arm
from lora_core.train.repro.tensorboard_grid import arm_hparams, run_metrics


def test_every_setting_is_text_whatever_the_arm_kind():
    arms = [(Arm("lora", "lora", train={"rank": 8, "lr": 1e-3}), {"lr": "0.001", "rank": "8"}),
            (Arm("full", "full"), {"lr": "5e-05", "rank": "-"}),
            (Arm("m", "merge", source="lora", projection="column", k=16), {"lr": "-", "merge": "lora column k=16"})]
    keys = None
    for arm, expected in arms:
        params = arm_hparams(arm, 0, {"lr": 5e-5})
        assert all(isinstance(v, str) for v in params.values()), params
        assert {k: params[k] for k in expected} == expected
        keys = keys or set(params)
        assert set(params) == keys


def test_run_metrics_keep_finite_numbers_only():
    row = {"metrics": {"safety.x.rate": {"value": 0.5}, "bad": {"value": math.nan}, "odd": {"value": None}},
           "overlap": {"16": {"energy_column": 0.04, "modules": 210}}, "train": {"final_loss": 1.5}}
    assert run_metrics(row) == {"eval/safety.x.rate": 0.5, "overlap/k16/energy_column": 0.04,
                                "overlap/k16/modules": 210.0, "train/final_loss": 1.5}
