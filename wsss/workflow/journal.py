"""Per-job journals: a resumed shard job reuses only the files *it* wrote.

Mask-producing shard jobs (CRF, IR labels, IRN masks, seed masks, DeepLab predictions) write one
PNG per image into a folder named after the config hash. Skipping every PNG that exists would make
a forced rerun (``snakemake -R crf_shard``, a retrained model upstream) reuse the PNGs of an
earlier *completed* run: the outputs would not be the job's own. A :class:`ShardJournal` keeps a
list of the images this job wrote beside the job's marker (``<marker>.journal``):

* at the start, a journal whose *identity* (config hash and the size / mtime / inode of every
  input file) matches the job's is an interrupted attempt of the same job: its images are kept;
  any other journal (other inputs, other config) and any PNG not listed are redone;
* each finished image is appended (one line, flushed), so a ``kill -9`` loses at most the image in
  flight (PNGs are renamed into place complete, see :func:`wsss.io.atomic_path`);
* when the job is done the journal is removed: a later run of the same job, forced or not, starts
  from nothing and rewrites every PNG.

The journal is a text file: a first line of JSON (``{"format": 1, "identity": {...}}``), then one
image id per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Set

FORMAT = 1


def input_identity(paths: Iterable[str | os.PathLike]) -> Dict[str, list]:
    """``{path: [size, mtime_ns, inode]}`` of each input file: a rewritten input (Snakemake's
    outputs are renamed into place) changes at least the inode and mtime."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


class ShardJournal:
    """Which outputs this job wrote (see the module docstring).

    ``path``: the journal file; ``identity``: a JSON-able mapping that says which job this is
    (config hash, input identities). Use as::

        journal = ShardJournal(marker + ".journal", identity)
        done = journal.start(candidates)       # ids to skip: written by this same job before
        for i in todo: write(i); journal.record(i)
        journal.finish()                        # after the marker is written
    """

    def __init__(self, path: str | os.PathLike, identity: Mapping[str, Any]):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
        self._fh = None
        self._done: Set[str] = set()

    def _read(self) -> Optional[Set[str]]:
        """The ids of a journal with this identity, or None (no journal, another job's, unreadable)."""
        try:
            lines = self.path.read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        if not lines:
            return None
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            return None
        if head.get("format") != FORMAT or head.get("identity") != self.identity:
            return None
        return {line for line in lines[1:] if line}

    def start(self, exists: Optional[Any] = None) -> Set[str]:
        """Open the journal; return the ids an interrupted attempt of this same job wrote.

        ``exists(id) -> bool`` (optional) filters those ids to the ones whose files are still
        there. A journal of another identity is replaced, so nothing of it is reused. Starting an
        open journal again returns the same ids."""
        if self._fh is not None:
            return set(self._done)
        done = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if done is None:
            with open(self.path, "w") as fh:
                fh.write(json.dumps({"format": FORMAT, "identity": self.identity}, sort_keys=True) + "\n")
            done = set()
        elif exists is not None:
            done = {i for i in done if exists(i)}
        self._fh = open(self.path, "a", buffering=1)
        self._done = set(done)
        return done

    def record(self, image_id: str) -> None:
        """Append one finished id (line-buffered: on disk when this returns)."""
        if self._fh is None:
            raise RuntimeError(f"journal {self.path} not started")
        if "\n" in image_id:
            raise ValueError(f"image id {image_id!r} contains a newline")
        self._fh.write(image_id + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """The job is complete: remove the journal (the next run of this job redoes everything)."""
        self.close()
        self.path.unlink(missing_ok=True)


def journal_for(marker: str | os.PathLike, *, config_hash: str, inputs: Sequence[str | os.PathLike]) -> ShardJournal:
    """The journal of the shard job whose tracked output is ``marker``."""
    return ShardJournal(f"{marker}.journal", {"config_hash": config_hash, "inputs": input_identity(inputs)})


class NoJournal:
    """A stand-in for direct calls outside a shard job: nothing is reused, nothing is recorded."""

    def start(self, exists: Optional[Any] = None) -> Set[str]:
        return set()

    def record(self, image_id: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass
