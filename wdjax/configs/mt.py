"""Translation, Bible En-De: the teacher trained from scratch, then students that keep its
encoder and shrink its decoder (WD's setting). One file, every row of the MT table:

  wdjax finetune mt:cpu                                  # the teacher
  wdjax distill  mt:cpu                                  # seq-KD student (bitext + teacher beams)
  wdjax distill  mt:cpu --set task.seq_kd=none --phase distill_scratch
                                                                    # from scratch: bitext only
  wdjax distill  mt:cpu --set method.name=wd --set method.init=identity \
                 --set distill.optim.lr=3e-4 --set method.phase2_lr=1.5e-3     # WD, phase 1 + 2
  wdjax eval     mt:cpu --model runs/bible_en_de/distill/model      # BLEU

or all of them with `python benchmarks/mt/run.py --hardware cpu` (BLEU, parameters, decoding
speed). The from-scratch and seq-KD students share a workdir with the teacher; their phase
directories differ by the method label and `--phase`.

Runtime (cpu, 2 cores): teacher ~25 min, sequence-KD data ~5 min, each student ~10 min.
Result (cpu, seed 0, test BLEU, beam 4): teacher 7.73, from scratch 3.15, seq-KD 4.42, WD 7.39;
students decode 3.2x faster at batch 64, 1.6x at batch 1 (benchmarks/mt/results_cpu.md).
gpu: not yet measured (no GPU lent).
"""

from wdjax import presets


def get_config(hardware: str = "cpu"):
  return presets.bible_translation(hardware)
