"""CARE pretraining on Ray Train: stage I (iBOT-style SSL) and stage II (RNA/protein CLIP).

    from care_scale.config import load_config
    from care_scale.training import Stage1Config, fit
    cfg = load_config(Stage1Config, "configs/train_stage1.yaml", ["optim.steps=500"])
    result = fit("stage1", cfg)    # TrainResult(output=<CARE checkpoint dir>, history=[...])
"""

from care_scale.training.config import Stage1Config, Stage2Config
from care_scale.training.loop import TrainResult, fit

__all__ = ["Stage1Config", "Stage2Config", "TrainResult", "fit"]
