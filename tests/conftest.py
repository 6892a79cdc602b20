"""Shared fixtures: the real sample clips, a real S3-protocol server (moto) on loopback, and
one local Ray instance for the whole test session."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One compute thread per test process: tests use tiny models, and several OpenMP threads on a
# loaded 2-core machine spin against each other (measured 10-25x slower). Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# The node-local chunk cache of video ranges (operators/cache.py): one per test session,
# removed at exit, instead of the machine's shared one.
_CACHE_DIR = tempfile.mkdtemp(prefix="vidprune-test-cache-")
os.environ.setdefault("VIDPRUNE_CACHE_DIR", _CACHE_DIR)
atexit.register(shutil.rmtree, _CACHE_DIR, True)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "jobs" / "samples" / "videos"

# Tests never talk to a real cloud: no credentials or config from the developer's machine.
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "RAY_ADDRESS"):
    os.environ.pop(_var, None)
os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)
os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="session")
def sample_videos() -> Path:
    """The real clips shipped with the repository (see jobs/samples/videos/README.md)."""
    return SAMPLES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto S3 server process on 127.0.0.1, with the credentials to reach it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        # Distinctive secrets: tests grep everything a job writes and logs for them.
        self.env = {"AWS_ACCESS_KEY_ID": "testing-key-id",
                    "AWS_SECRET_ACCESS_KEY": f"canary-secret-{secrets.token_hex(12)}",
                    "AWS_SESSION_TOKEN": f"canary-token-{secrets.token_hex(12)}",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto_server exited at start")
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start in 30 s")

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 client_kwargs={"endpoint_url": self.endpoint_url,
                                                "region_name": "us-east-1"},
                                 skip_instance_cache=True)

    def reset(self) -> None:
        """Drop every bucket (moto's reset endpoint)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset", method="POST"), timeout=10).read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_server):
    """A clean S3 server for one test (all buckets dropped before it)."""
    s3_server.reset()
    return s3_server


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance shared by every test that needs Ray. Started after the S3
    server so that its workers inherit the server's credentials from the environment, as
    they would from a user's shell."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


# -- generated videos and tiny models ---------------------------------------------------------

def make_video(path: Path, frames: int, size: tuple[int, int] = (64, 48), fps: int = 10,
               gop: int = 12) -> Path:
    """A real H.264 MP4 of ``frames`` frames of FFmpeg's moving test pattern, made with
    imageio-ffmpeg's ffmpeg binary."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc=size={size[0]}x{size[1]}:rate={fps}",
                    "-frames:v", str(frames), "-pix_fmt", "yuv420p", "-c:v", "libx264",
                    "-g", str(gop), str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def video_factory():
    """``make_video(path, frames, size=(64, 48), fps=10)``: generate a small real video."""
    return make_video


#: Architecture options of the tiny models the pipeline tests run (fast on one CPU core).
TINY_DETECTOR = {"input_size": 64, "depth": 2, "dim": 32, "heads": 2, "neck_channels": 16}
TINY_RECOGNIZER = {"input_size": 32, "depth": 2, "dim": 32, "heads": 2, "clip_frames": 4}


def _save_tiny(path: Path, arch: str, labels: list[str], options: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    from models import build_arch

    torch.manual_seed(0)
    model = build_arch(arch, class_names=labels, **options)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return {"arch": arch, "checkpoint": str(path), "labels": labels, "options": dict(options)}


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> dict:
    """The ``model`` section of a job spec for a tiny random-init ViTDet saved with
    safetensors (loaded through the real checkpoint path)."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-det.safetensors", "vitdet-ti",
                      ["person", "car", "dog"], TINY_DETECTOR)


@pytest.fixture(scope="session")
def tiny_recognizer(tmp_path_factory) -> dict:
    """The ``model`` section of a job spec for a tiny random-init VideoMAE."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-rec.safetensors", "videomae-ti",
                      [f"action_{i}" for i in range(8)], TINY_RECOGNIZER)
