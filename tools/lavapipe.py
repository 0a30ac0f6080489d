"""`make maniskill` on a machine without CUDA: Mesa's software Vulkan driver for SAPIEN.

SAPIEN needs a Vulkan device even for state observations. On a CPU-only machine Mesa's lavapipe
>= 24.3 provides one (``VK_KHR_external_semaphore_fd``; Debian 12's own Mesa 22.3 lacks it).
This unpacks Debian bookworm-backports' mesa-vulkan-drivers (25.0.7) into
``<sys.prefix>/vulkan-cpu/`` of the interpreter that runs it (nothing installed system-wide) and
writes ``lvp_icd.json`` there, where ``vlafast.envs.maniskill.find_vulkan_icd`` looks for it.

    .venv/bin/python -m tools.lavapipe [--dest DIR]     # from the checkout's root
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys


def install_lavapipe(dest: str | os.PathLike[str] | None = None) -> str:
    """Unpack Mesa's software Vulkan driver (lavapipe) from the Debian release's backports into
    ``dest`` (default ``<sys.prefix>/vulkan-cpu``) without installing it system-wide, and write
    ``lvp_icd.json`` pointing at it. Needs apt-get and dpkg (Debian 12 here); the mirror is the
    one the system's apt sources already use. Returns the manifest's path."""
    dest = pathlib.Path(dest or pathlib.Path(sys.prefix) / "vulkan-cpu").resolve()
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError("install_lavapipe needs apt-get and dpkg (a Debian system)")
    release = dict(line.strip().split("=", 1) for line in open("/etc/os-release") if "=" in line)
    codename = release.get("VERSION_CODENAME", "").strip('"')
    sources = "\n".join(open(f).read() for f in glob.glob("/etc/apt/sources.list.d/*.sources")
                        + glob.glob("/etc/apt/sources.list") if os.path.isfile(f))
    uris = [u for u in re.findall(r"(?:URIs:|deb)\s+(https?://\S+)", sources) if "security" not in u]
    if not codename or not uris:
        raise RuntimeError(f"cannot tell the Debian release ({codename!r}) or its mirror from /etc/apt")
    lists = dest / "apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (dest / "sources.list").write_text(f"deb {uris[0]} {codename}-backports main\n")
    opts = [f"-oDir::Etc::SourceList={dest / 'sources.list'}", "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={lists}"]
    subprocess.run(["apt-get", *opts, "-qq", "update"], check=True)
    for old in dest.glob("mesa-vulkan-drivers_*.deb"):
        old.unlink()
    subprocess.run(["apt-get", *opts, "-qq", "download", f"mesa-vulkan-drivers/{codename}-backports"],
                   check=True, cwd=dest)
    (deb,) = dest.glob("mesa-vulkan-drivers_*.deb")
    subprocess.run(["dpkg", "-x", str(deb), str(dest / "root")], check=True)
    (lib,) = (dest / "root").glob("usr/lib/*/libvulkan_lvp.so")
    manifest = dest / "lvp_icd.json"
    manifest.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.3.0"}}\n' % lib)
    return str(manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.lavapipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=None, help="folder to unpack into (default <sys.prefix>/vulkan-cpu)")
    args = p.parse_args(argv)
    print(f"maniskill: Vulkan driver {install_lavapipe(args.dest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
