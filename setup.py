"""Install bootlink's folders (server/, client/, common/, usb/, ramdisk/) under one namespace.

The design card keeps the top-level layout flat; `package_dir` maps each folder onto
`bootlink.<folder>` so that code imports `bootlink.common`, `bootlink.server`, ...
"""

from setuptools import Extension, setup

SUBPACKAGES = {
    "bootlink": "bootlink",
    "bootlink.common": "common",
    "bootlink.server": "server",
    "bootlink.client": "client",
    "bootlink.client.sources": "client/sources",
    "bootlink.usb": "usb",
    "bootlink.ramdisk": "ramdisk",
    "bootlink.systemd": "systemd",  # data only: unit, udev rule, NetworkManager snippet
}

setup(
    name="bootlink",
    version="0.1.0",
    description="Boot your laptop's own disk on another PC over a network cable",
    python_requires=">=3.11",
    packages=list(SUBPACKAGES),
    package_dir=SUBPACKAGES,
    package_data={
        "bootlink.ramdisk": ["files/*", "files/**/*"],
        "bootlink.server": ["hooks/**/*"],
        "bootlink.systemd": ["*.service", "*.rules", "*.conf"],
    },
    include_package_data=True,
    # libnbd's bindings come from Debian's python3-libnbd (`import nbd`); the PyPI
    # package called `nbd` is unrelated and must never be installed.
    install_requires=["cryptography>=38", "PyYAML>=6", "pyroute2>=0.7", "psutil>=5.9"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "swarm": ["pycryptodome>=3.15"],
        # ISO sources; Debian: python3-pycdlib (preferred in the ramdisk)
        "iso": ["pycdlib>=1.11"],
    },
    entry_points={"console_scripts": ["bootlink = bootlink.cli:main"]},
    # Plain C helpers loaded with ctypes (no Python.h needed), all optional: without a
    # compiler Swarm's BMT hashing falls back to pycryptodome (~15x slower), EAX's
    # MAC chains to OpenSSL's CBC, one frame per core (~6x slower), and IPFS block
    # checks to hashlib, one block at a time (~2x slower).
    ext_modules=[
        Extension(
            f"bootlink.common.{name}",
            [f"common/{name}.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
        for name in ("_bmt", "_omac", "_sha256mb")
    ],
)
