"""Quickstart: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes, distil it into three 3x192 students.

Command (fetches the teacher and the data, ~95 MB, on first use):

  wdjax pipeline quickstart

Runtime: 7m13s on a 2-core Intel Xeon (jax 0.10.2) with the assets cached; the first run adds
the ~95 MB download. Result (seed 0, test split of 1,320 snippets, best-validation checkpoint;
another CPU's rounding moves the students by up to a point, README's Quickstart):

  | model                                          | test accuracy | validation |
  |------------------------------------------------|---------------|------------|
  | teacher, all-MiniLM-L6-v2 fine-tuned           | 82.42         | 82.36      |
  | student 3x192, weight selection + KD, lr 1e-4  | 77.95         | 75.94      |
  | student 3x192, logit KD (T=2, a=0.9)           | 76.74         | 79.82      |
  | student 3x192, CE only, same 652 steps         | 77.73         | 77.47      |
"""

from wdjax.config import (Config, DataConfig, KDConfig, OptimConfig, StudentConfig, TeacherConfig,
                          TrainConfig)


def get_config() -> Config:
  return Config(
      workdir="runs/quickstart",
      seed=0,
      # One epoch of fine-tuning without dropout and with the word embeddings frozen: on a CPU
      # the step is compute-bound, and dropout's random bits alone cost a third of it.
      teacher=TeacherConfig(model="all-MiniLM-L6-v2", hidden_dropout=0.0, attention_dropout=0.0),
      finetune=TrainConfig(batch_size=32, epochs=1.0,
                           optim=OptimConfig(lr=1e-4, frozen=("embeddings/word",))),
      # 3 layers x 192, 12 heads of 16, FFN 768: the student shape of docs/data.md's PyTorch baselines.
      student=StudentConfig(num_layers=3, hidden_size=192, num_heads=12, intermediate_size=768,
                            hidden_dropout=0.1, attention_dropout=0.0),
      # Two epochs, validated every half epoch; the best-validation student is exported and
      # tested (the protocol of docs/data.md's PyTorch reference numbers).
      distill=TrainConfig(batch_size=32, epochs=2.0, eval_every=163, optim=OptimConfig(lr=3e-4)),
      kd=KDConfig(temperature=2.0, alpha=0.9),
      data=DataConfig(dataset="rotten-tomatoes", max_length=64),
  )
