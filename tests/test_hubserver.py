"""The real huggingface_hub 2.4 client against the fake Hub in tests/hubserver.py.

Client retry behaviour, from its source (callers of utils/_http.py `http_backoff`); the cases
marked * are observed in the tests below:
- retried on 408/429/5xx, after 1 s (doubling) or Retry-After + 1 s: preupload*, LFS PUT*,
  LFS batch and verify, tree listing (list_repo_files, snapshot_download);
- not retried, the error surfaces at once as HfHubHTTPError: the commit POST*, whoami, create_repo,
  repo_info/model_info (a timeout there raises httpx2.TimeoutException*);
- hf_hub_download: a failed HEAD (timeout*, 429, 5xx) falls back to the local cache; if the file is
  not cached the HEAD is asked again with a 60 s timeout and retries. A 401 is raised as is*.
  The GET itself is retried on 408/429 only.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
)

from tests.hubserver import HubServer, patch_hf_client, running_hub

# The client itself uploads with httpx2's deprecated `data=<file>`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_fake_token_for_tests_0123456789"
REPO = "test-user/adapter"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with running_hub(tmp_path / "hub", TOKEN) as server:
        patch_hf_client(monkeypatch, server, tmp_path / "hf_home")
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}\n')
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Adapter\n")
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024))
    (folder / "training_args.bin").write_bytes(os.urandom(1024))  # a second LFS file, uploaded concurrently
    return folder


def test_whoami_and_bad_tokens(hub: HubServer, api: HfApi, tmp_path):
    assert api.whoami()["name"] == "test-user"

    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(endpoint=hub.url, token="hf_wrong").whoami()
    assert wrong.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as missing:
        HfApi(endpoint=hub.url, token=False).create_repo(REPO)
    assert missing.value.response.status_code == 401
    assert not api.repo_exists(REPO)

    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as download:  # not masked as a connectivity problem
        hf_hub_download(REPO, ".gitattributes", token="hf_wrong", cache_dir=tmp_path / "cache")
    assert download.value.response.status_code == 401


def test_create_repo_private_and_idempotent(hub: HubServer, api: HfApi):
    url = api.create_repo(REPO, private=True)
    assert url.repo_id == REPO and hub.repo(REPO).private
    assert api.model_info(REPO).private is True

    api.create_repo(REPO, private=True, exist_ok=True)  # second call: 409 swallowed by the client
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert len(hub.commits(REPO)) == 1  # only the Hub's "initial commit" with .gitattributes

    api.create_repo("test-user/public", private=False)
    assert hub.repo("test-user/public").private is False
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("test-user/missing")


def test_upload_folder_roundtrip_with_lfs(hub: HubServer, api: HfApi, model_dir, tmp_path):
    api.create_repo(REPO, private=True)
    info = api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Add adapter")

    assert len(info.oid) == 40 and info.oid == hub.commits(REPO)[0].oid
    assert info.commit_url == f"{hub.url}/{REPO}/commit/{info.oid}"
    expected = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    stored = hub.files(REPO)
    assert stored.pop(".gitattributes").startswith(b"*.safetensors filter=lfs")
    assert stored == expected
    assert hub.repo(REPO).head.files["adapter_model.safetensors"].lfs
    assert not hub.repo(REPO).head.files["adapter_config.json"].lfs
    assert hub.counts["lfs_batch"] == 1 and hub.counts["lfs_upload"] == 2 and hub.counts["commit"] == 1
    assert hub.counts["validate_yaml"] >= 1  # the client checks a README.md's metadata first

    # Read back through the client: listing, single-file download (HEAD + GET), snapshot, history.
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *expected])
    weights = hf_hub_download(REPO, "adapter_model.safetensors", endpoint=hub.url, token=TOKEN,
                              cache_dir=tmp_path / "cache")
    assert Path(weights).read_bytes() == expected["adapter_model.safetensors"]
    snapshot = snapshot_download(REPO, endpoint=hub.url, token=TOKEN, local_dir=tmp_path / "snap")
    assert Path(snapshot) == (tmp_path / "snap").resolve()
    for name, content in expected.items():
        assert (tmp_path / "snap" / name).read_bytes() == content
    assert [c.title for c in api.list_repo_commits(REPO)] == ["Add adapter", "initial commit"]
    assert api.model_info(REPO).sha == info.oid

    # Re-uploading identical content: the client sees matching remote oids and skips the commit.
    again = api.upload_folder(repo_id=REPO, folder_path=model_dir)
    assert again.oid == info.oid and hub.counts["commit"] == 1 and hub.counts["lfs_upload"] == 2

    # The token travels only in Authorization headers, never in a URL; storage PUTs carry no auth at all.
    for record in hub.requests:
        assert TOKEN not in record.path
        assert all(TOKEN not in value for name, value in record.headers if name.lower() != "authorization")
    uploads = [r for r in hub.requests if r.kind == "lfs_upload"]
    assert uploads and not any("authorization" in r.text.lower() or TOKEN in r.text for r in uploads)


def test_create_commit_add_and_delete(hub: HubServer, api: HfApi):
    api.create_repo(REPO)
    first = api.create_commit(REPO, commit_message="one", operations=[
        CommitOperationAdd("sub/a.txt", b"alpha"),
        CommitOperationAdd("weights.bin", b"\x00" * 100),  # binary => LFS even though tiny
    ])
    second = api.create_commit(REPO, commit_message="two", parent_commit=first.oid,
                               operations=[CommitOperationDelete("sub/a.txt")])
    assert hub.files(REPO, first.oid)["sub/a.txt"] == b"alpha"
    assert set(hub.files(REPO)) == {".gitattributes", "weights.bin"}
    assert [c.oid for c in hub.commits(REPO)[:2]] == [second.oid, first.oid]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "sub/a.txt", endpoint=hub.url, token=TOKEN)
    with pytest.raises(HfHubHTTPError) as stale:  # parent_commit no longer the head
        api.create_commit(REPO, commit_message="three", parent_commit=first.oid,
                          operations=[CommitOperationAdd("b.txt", b"b")])
    assert stale.value.response.status_code == 412


def test_injected_errors_are_retried_or_surface(hub: HubServer, api: HfApi):
    api.create_repo(REPO)
    hub.fail_next(1, 500, path_regex="/preupload/")
    hub.fail_next(1, 429, path_regex=r"^PUT /lfs-upload/")
    api.upload_file(repo_id=REPO, path_or_fileobj=b"\x00" * 1024, path_in_repo="w.safetensors")
    assert hub.counts["preupload"] == 2 and hub.counts["lfs_upload"] == 2  # both retried by the client
    assert [r.status for r in hub.requests if r.kind == "lfs_upload"] == [429, 200]

    hub.fail_next(1, 503, path_regex=r"^POST .*/commit/")
    with pytest.raises(HfHubHTTPError) as failed:  # the commit POST is not retried
        api.upload_file(repo_id=REPO, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert failed.value.response.status_code == 503
    assert "x.txt" not in hub.files(REPO)


def test_injected_delay_trips_client_timeout(hub: HubServer, api: HfApi, tmp_path):
    api.create_repo(REPO)
    hub.fail_next(1, status=None, path_regex=r"^GET /api/models/", delay=1)
    with pytest.raises(httpx2.TimeoutException):
        api.model_info(REPO, timeout=0.2)
    assert api.model_info(REPO).id == REPO  # the delay was consumed

    # hf_hub_download shrugs off a timed-out HEAD when the file is not cached: it asks again, patiently.
    api.upload_file(repo_id=REPO, path_or_fileobj=b"hello", path_in_repo="a.txt")
    hub.fail_next(1, status=None, path_regex=r"^HEAD /", delay=1)
    path = hf_hub_download(REPO, "a.txt", token=TOKEN, etag_timeout=0.2, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == b"hello"
    assert [r.method for r in hub.requests if r.kind == "resolve"] == ["HEAD", "HEAD", "GET"]
