"""Reads the authors' files, unmodified, from a checkout of their repository, for the generators.

Shared by ``generate.py`` (the PyTorch files) and ``generate_bsam.py`` (bSAM's JAX files). Nothing
here imports the authors' code or torch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIRROR = Path('/work/.mirror')  # where this project's tooling puts repository snapshots


def put_on_path(spec: dict, label: str) -> None:
  """Copies ``spec['files']`` at ``spec['commit']`` to a temporary folder on ``sys.path``.

  The checkout is the one named by ``spec['env']`` (a work tree or a bare git directory), else
  this machine's snapshot under /work/.mirror. Each file is checked to be byte for byte the
  recorded one (its sha256) before it is copied; never into the project.
  """
  path = os.environ.get(spec['env'])
  if path is None and (MIRROR / spec['mirror'] / 'repo').is_dir():
    path = str(MIRROR / spec['mirror'] / 'repo')
  if path is None:
    raise FileNotFoundError(
      f'{label}: give a {spec["repository"]} checkout in {spec["env"]} '
      f'(git clone https://github.com/{spec["repository"]} && git checkout {spec["commit"]})'
    )
  source = Path(path)
  bare = (source / 'HEAD').is_file() and (source / 'objects').is_dir()
  root = Path(tempfile.mkdtemp(prefix=f'official-{label}-'))
  for name, digest in spec['files'].items():
    if bare:
      data = subprocess.run(
        ['git', '--git-dir', str(source), 'show', f'{spec["commit"]}:{name}'],
        check=True,
        capture_output=True,
      ).stdout
    else:
      data = (source / name).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
      raise SystemExit(f'{source}: {name} has sha256 {actual}, expected {digest}')
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  sys.path.insert(0, str(root))


def provenance(spec: dict) -> dict:
  """What a trajectory file records of where the official file came from."""
  return {
    'repository': spec['repository'],
    'url': f'https://github.com/{spec["repository"]}',
    'commit': spec['commit'],
    'file': spec['file'],
    'file_last_changed_in': spec['file_last_changed_in'],
    'sha256': spec['files'][spec['file']],
    'license': spec['license'],
    'loaded_from': f'{spec["repository"]} at {spec["commit"]} (unmodified, checked by sha256)',
  }
