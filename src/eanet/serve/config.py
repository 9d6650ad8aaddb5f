"""`ServeConfig`: the settings of `eanet serve`, and the check for its optional dependencies."""

import importlib.util
from dataclasses import asdict, dataclass

from eanet.choices import PRECISIONS
from eanet.errors import ConfigError, EANetError
from eanet.options import check_declared, check_known, option

CONFIG_ENV = "EANET_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker


_DEPENDENCIES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


@dataclass
class ServeConfig:
    """Everything `eanet serve` is started with."""

    checkpoint: str
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(8000, help="TCP port", low=0, high=65535)
    max_batch: int = option(64, help="images per forward pass", positive=True)
    max_wait_ms: float = option(
        5.0, help="how long a request waits for others to share its forward pass", low=0
    )
    workers: int = option(1, help="uvicorn worker processes, each loading the model", positive=True)
    max_upload_mb: float = option(
        10.0, help="request body limit in MB, larger is refused with 413", positive=True
    )
    max_images: int = option(64, help="images per request, more is refused with 413", positive=True)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    precision: str = option(
        "fp32",
        help="forward passes in 'fp32', 'bf16', or 'auto' (bf16 where the device computes "
        "it natively and faster; on a CPU, passes too small for bf16 to pay in fp32, as "
        "timed at start)",
        choices=PRECISIONS,
    )
    accel: bool = option(
        True,
        help="the faster equivalents of the model's layers (eanet.accel; --no-accel: the "
        "plain model's torch ops)",
    )
    compile: bool = option(
        False,
        help="torch.compile the forward pass, compiled at start for every batch size (tens "
        "of seconds before the server listens)",
    )
    threads: int | None = option(
        None,
        help="torch threads per worker",
        shown_default="cores / workers - 1, at least 1: a core is left for HTTP and decoding",
        positive=True,
    )
    max_image_mp: float = option(
        16.0,
        help="megapixels per image, read from its header before decoding; more is refused "
        "with 413 (decoding takes up to 40 bytes a pixel)",
        positive=True,
    )
    max_request_mp: float = option(
        64.0,
        help="megapixels of all images of one request together (at least --max-image-mp); "
        "more is refused with 413",
        positive=True,
    )
    max_large_decodes: int = option(
        1,
        help="requests above 1 megapixel decoded at once (each up to --max-image-mp); the "
        "others wait, and smaller requests have their own decode threads",
        positive=True,
    )
    header_timeout_s: float = option(
        10.0,
        help="seconds a connection may take to send a request's headers, then it is closed",
        positive=True,
    )
    body_timeout_s: float = option(
        30.0,
        help="seconds a request may take to send its whole body, then it gets 408 and the "
        "connection is closed",
        positive=True,
    )
    keep_alive_s: float = option(
        5.0,
        help="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)",
        positive=True,
    )
    max_header_kb: int = option(
        16,
        help="size limit of a request's headers in KiB; larger is answered 431 and closed",
        positive=True,
    )
    max_connections: int = option(
        100,
        help="connections and requests in progress at once (uvicorn's limit_concurrency); "
        "a request above it is answered 503",
        positive=True,
    )
    max_connections_per_ip: int = option(
        20,
        help="connections one client address may hold open at once; one more is answered 429 "
        "and closed (behind a reverse proxy every client has the proxy's address: raise it)",
        positive=True,
    )
    max_connection_s: float = option(
        120.0,
        help="seconds any connection may stay open, whatever it sends, then it is closed",
        positive=True,
    )
    decode_s_per_mp: float = option(
        0.5,
        help="CPU seconds a request's images may take to decode, per megapixel of their "
        "header sizes (at least one megapixel's worth); beyond it the decode stops and the "
        "request gets 413",
        positive=True,
    )

    def __post_init__(self) -> None:
        self.checkpoint = str(self.checkpoint)
        check_declared(self)  # types and ranges, as declared with each field
        if self.max_request_mp < self.max_image_mp:
            raise ConfigError(
                f"--max-request-mp {self.max_request_mp} must be >= --max-image-mp "
                f"{self.max_image_mp}: a request must admit one image of the largest size"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_mp * 1_000_000)

    @property
    def max_request_pixels(self) -> int:
        return int(self.max_request_mp * 1_000_000)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServeConfig":
        """Build from `to_dict`'s output; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"serve settings are a {type(data).__name__}, not an object")
        check_known(data, cls, "serve setting")
        return cls(**data)


def check_dependencies() -> None:
    """Raise a one-line EANetError naming the extra when fastapi/uvicorn/multipart are missing."""
    missing = [pip for mod, pip in _DEPENDENCIES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise EANetError(
            f"eanet serve needs {', '.join(missing)}, not installed; "
            "install them with: pip install 'eanet[serve]'"
        )
