"""Where the teacher's weights come from: torch's hub download (against a loopback server), a local
file, or random init; and what happens offline."""
import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

from models.feature_extractor import FeatureExtractor
from models.teacher_weights import resolve_teacher_weights
from utils.errors import UserError


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL, request log)."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def resnet18_file(folder: Path, name: str | None = None) -> tuple[Path, dict]:
    """A resnet18 state_dict saved under torchvision's naming, <arch>-<first 8 hex of sha256>.pth."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    tmp = folder / "weights.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / (name or f"resnet18-{digest}.pth")
    tmp.rename(path)
    return path, state


def test_download_is_hash_checked_loaded_and_cached(served, tmp_path):
    www, base, requests = served
    path, state = resnet18_file(www)
    cache = tmp_path / "cache"
    loaded, description = resolve_teacher_weights("resnet18", True, None, False, url=f"{base}/{path.name}",
                                                  model_dir=str(cache))
    assert description == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    teacher = FeatureExtractor("resnet18", loaded, frozen=True)
    assert torch.equal(teacher.stages[0][0].weight, state["conv1.weight"])
    resolve_teacher_weights("resnet18", True, None, False, url=f"{base}/{path.name}", model_dir=str(cache))
    assert len(requests) == 1  # the second call reads torch's hub cache


def test_a_download_with_the_wrong_hash_is_refused(served, tmp_path):
    www, base, _ = served
    path, _ = resnet18_file(www, name="resnet18-00000000.pth")
    with pytest.raises(UserError, match="cannot download .*model.teacher_weights="):
        resolve_teacher_weights("resnet18", True, None, False, url=f"{base}/{path.name}", model_dir=str(tmp_path))


def test_offline_fails_clearly_unless_fallback_is_allowed(served, tmp_path, capsys):
    _, base, _ = served
    missing = f"{base}/resnet18-f37072fd.pth"  # the server has no such file: as good as offline
    with pytest.raises(UserError) as error:
        resolve_teacher_weights("resnet18", True, None, False, url=missing, model_dir=str(tmp_path))
    message = str(error.value)
    assert "model.teacher_weights=/path/to/resnet18-f37072fd.pth" in message and "\n" not in message
    state, description = resolve_teacher_weights("resnet18", True, None, True, url=missing, model_dir=str(tmp_path))
    assert state is None and "random init" in description
    assert "RANDOM teacher" in capsys.readouterr().err
    # The next category of a sweep neither tries the download again nor repeats the warning.
    again = resolve_teacher_weights("resnet18", True, None, True, url=missing, model_dir=str(tmp_path))
    assert again == (None, description) and capsys.readouterr().err == ""


def test_a_folder_as_teacher_weights_is_named_as_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a folder; give the path of a resnet18 state_dict file"):
        resolve_teacher_weights("resnet18", True, str(tmp_path), False)


def test_local_file_with_or_without_head_and_wrapped(tmp_path):
    path, state = resnet18_file(tmp_path)
    loaded, description = resolve_teacher_weights("resnet18", True, str(path), False)
    assert description.startswith(f"local file {path} (sha256 ") and torch.equal(loaded["fc.weight"], state["fc.weight"])
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in headless.items()}}, wrapped)
    loaded, _ = resolve_teacher_weights("resnet18", True, str(wrapped), False)
    assert set(loaded) == set(headless)


def test_random_init_says_so():
    state, description = resolve_teacher_weights("resnet18", False, None, False)
    assert state is None and description.startswith("random init (model.pretrained=false)")
