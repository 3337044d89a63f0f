"""MD5 identification of DeepMind's released files (load_pretrained and
scripts/convert_checkpoint.py), with small files of our own."""
import hashlib
import os
import sys
import warnings

import dill
import pytest

import nfnets.checkpoints as C
from nfnets.checkpoints import release_files

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_checkpoints_scripts import (TINY, TINY_JSON, _script,  # noqa: E402
                                      random_tree)


def _write(path, tree):
  path.write_bytes(dill.dumps(tree))
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_table_has_seven_distinct_digests():
  assert sorted(C.RELEASED_MD5) == [f'F{i}' for i in range(7)]
  assert len(set(C.RELEASED_MD5.values())) == 7
  assert all(len(d) == 32 and int(d, 16) >= 0
             for d in C.RELEASED_MD5.values())


def test_matching_digest_names_the_release(tmp_path, monkeypatch):
  path = tmp_path / 'weights.pkl'
  md5 = _write(path, random_tree(1000))
  assert C.file_md5(str(path)) == md5
  check = C.check_file(str(path))
  assert check.release is None and check.named is None
  assert 'not one of' in check.describe()
  monkeypatch.setitem(release_files.RELEASED_MD5, 'F2', md5)
  check = C.check_file(str(path))
  assert check.release == 'F2' and check.md5 == md5
  assert 'released F2_haiku.npz' in check.describe()


def test_named_release_with_other_digest_warns_once(tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  md5 = _write(path, random_tree(1000))
  with pytest.warns(C.ReleaseChecksumWarning) as record:
    params = C.load_pretrained(str(path), 'F0', model_kwargs=TINY)
  assert len(record) == 1
  msg = str(record[0].message)
  assert md5 in msg and C.RELEASED_MD5['F0'] in msg and 'F0' in msg
  assert 'NFNet/~/linear' in params  # still loaded
  # A name that is not a release file's: no warning.
  other = tmp_path / 'mine.npz'
  other.write_bytes(path.read_bytes())
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    C.load_pretrained(str(other), 'F0', model_kwargs=TINY)


def test_convert_script_reports_digest_and_warns_once(tmp_path, capsys,
                                                      monkeypatch):
  convert = _script('convert_checkpoint')
  path = tmp_path / 'F3_haiku.npz'
  md5 = _write(path, random_tree(1000))
  args = ['--input', str(path), '--variant', 'F0', '--model_kwargs',
          TINY_JSON]
  with pytest.warns(C.ReleaseChecksumWarning) as record:
    assert convert.main(args) == 0
  assert len(record) == 1 and C.RELEASED_MD5['F3'] in str(record[0].message)
  assert f'MD5 {md5}' in capsys.readouterr().out
  monkeypatch.setitem(release_files.RELEASED_MD5, 'F3', md5)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert convert.main(args) == 0
  assert "DeepMind's released F3_haiku.npz" in capsys.readouterr().out
