"""A stand-in for Cloud Storage in tests: `gs://bucket/key` served from a local directory.

No bucket is reachable here. `install(root)` registers `FakeGCS` for fsspec's `gs`/`gcs`
protocols, which is where `etils.epath` (and so `qalign_jax.files`) finds gcsfs on a pod, so
`gs://b/run/x.json` is the file `root/b/run/x.json`. It is as strict as Cloud Storage where
it matters: objects cannot be appended to, and a "directory" exists only once an object is
under it (`mkdir` does nothing).

Orbax writes gs:// checkpoints through tensorstore's own gcs driver, which cannot be pointed
at a fake, so `install` also maps `checkpoint.orbax_path` (the one place that names orbax's
directory) to `root/.orbax/bucket/key`; everything else goes through the fake bucket.

`python -m tests.fake_gcs --config ... --workdir gs://...` is `qalign_jax.train` with the fake
installed (root from $FAKE_GCS_ROOT): the multi-process tests start it once per process.
"""

import os

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PREFIXES = ("gs://", "gcs://")


class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    root = ""  # set by `install`

    def __init__(self, *args, **kwargs):
        super().__init__(path=FakeGCS.root, fs=LocalFileSystem(auto_mkdir=True))

    # The root is read on every call: etils caches filesystem instances across `install`s.
    path = property(lambda self: FakeGCS.root, lambda self, value: None)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                return path[len(prefix) :]
        return path

    def _join(self, path):
        if isinstance(path, str):
            path = self._strip_protocol(path)
        return super()._join(path)

    def _relpath(self, path):
        rel = super()._relpath(path)
        return "gs://" + rel if isinstance(rel, str) else ["gs://" + r for r in rel]

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"{path}: Cloud Storage objects cannot be appended to.")
        return super().open(path, mode, *args, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass


def install(root: str, monkeypatch=None) -> None:
    """Serves gs:// from `root` in this process (and orbax's checkpoints from `root/.orbax`)."""
    from qalign_jax import checkpoint

    FakeGCS.root = os.path.abspath(root)
    os.makedirs(FakeGCS.root, exist_ok=True)
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)

    def orbax_path(path: str) -> str:
        if path.startswith("gs://"):
            return os.path.join(FakeGCS.root, ".orbax", path.removeprefix("gs://"))
        return os.path.abspath(path)

    if monkeypatch is None:
        checkpoint.orbax_path = orbax_path
    else:
        monkeypatch.setattr(checkpoint, "orbax_path", orbax_path)


def objects(root: str, prefix: str = "") -> list[str]:
    """Every object under gs://`prefix`, as keys relative to it (orbax's directory excluded)."""
    base = os.path.join(root, prefix)
    out = []
    for d, _, names in os.walk(base):
        if os.path.relpath(d, root).split(os.sep)[0] == ".orbax":
            continue
        out += [os.path.relpath(os.path.join(d, n), base) for n in names]
    return sorted(out)


if __name__ == "__main__":
    from absl import app

    install(os.environ["FAKE_GCS_ROOT"])
    from qalign_jax import train

    app.run(train.main)
