"""The pure parts of the lab's kernel choice: apt sources, package names, version selection."""

import pytest

from nvmeof_mp.lab import kernel
from nvmeof_mp.lab.__main__ import kernel_list
from nvmeof_mp.lab.kernel import LabError

ARCHIVE = "http://mirror.example.invalid/debian"

DEB822 = f"""\
Types: deb
# a comment line
URIs: http://security.example.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: {ARCHIVE}/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_archive_uri_from_deb822_skips_security_and_takes_the_release_suite():
    assert kernel.archive_uri([DEB822]) == ARCHIVE


def test_archive_uri_skips_a_disabled_stanza_and_one_without_main():
    disabled = "Enabled: no\nTypes: deb\nURIs: http://off.invalid/d\nSuites: bookworm\n" \
               "Components: main\n\nTypes: deb\nURIs: http://nomain.invalid/d\n" \
               "Suites: bookworm\nComponents: contrib\n"
    assert kernel.archive_uri([disabled, DEB822]) == ARCHIVE


def test_archive_uri_from_a_one_line_sources_list():
    text = ("# deb http://commented.invalid/debian bookworm main\n"
            "deb http://security.invalid/debian-security bookworm-security main\n"
            f"deb [arch=amd64 signed-by=/k.gpg] {ARCHIVE} bookworm main non-free-firmware\n")
    assert kernel.archive_uri([], [text]) == ARCHIVE


def test_archive_uri_without_a_main_archive_says_so():
    with pytest.raises(LabError, match="no Debian main archive"):
        kernel.archive_uri(["Types: deb\nURIs: http://x.invalid\nSuites: bookworm-security\n"
                            "Components: main\n"], ["deb-src http://y.invalid sid main\n"])


def test_host_archive_uri_reads_the_apt_dir(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert kernel.host_archive_uri(tmp_path) == ARCHIVE


def test_host_suite_from_os_release(tmp_path):
    path = tmp_path / "os-release"
    path.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\n')
    assert kernel.host_suite(path) == "bookworm"
    assert kernel.host_suite(tmp_path / "missing") is None


def test_private_sources_and_apt_options_stay_in_the_private_dir(tmp_path):
    line = kernel.private_sources(ARCHIVE, "trixie")
    assert line.split()[2:] == [ARCHIVE, "trixie", "main"]
    assert "signed-by=" in line
    opts = kernel.apt_options(tmp_path)
    values = [o for o in opts if o != "-o"]
    assert "Dir::Etc::sourceparts=-" in values
    for key in ("Dir::Etc::sourcelist", "Dir::State::Lists", "Dir::Cache", "Dir::State::status"):
        value = next(v for v in values if v.startswith(key + "="))
        assert value.split("=", 1)[1].startswith(str(tmp_path))


@pytest.mark.parametrize("package,version", [
    ("linux-image-5.10.0-32-amd64", "5.10"),
    ("linux-image-6.1.0-56-amd64", "6.1"),
    ("linux-image-6.12.117+deb13-amd64", "6.12"),
    ("linux-binary-7.2.13+deb14-amd64", "7.2"),
])
def test_short_version(package, version):
    assert kernel.short_version(package) == version


def test_short_version_of_a_meta_package_is_an_error():
    with pytest.raises(LabError):
        kernel.short_version("linux-image-amd64")


META_DEPENDS = """linux-image-amd64
  Depends: linux-image-6.12.117+deb13-amd64
"""


def test_image_package_matches_the_wanted_version_only():
    assert kernel.image_package(META_DEPENDS, "6.12") == "linux-image-6.12.117+deb13-amd64"
    assert kernel.image_package(META_DEPENDS, "6.1") is None
    assert kernel.image_package("", "6.12") is None


def test_companion_packages_of_a_7x_meta_image():
    image = "linux-image-7.2.13+deb14-amd64"
    out = (f"{image}\n  Depends: linux-binary-7.2.13+deb14-amd64\n"
           "  Depends: linux-modules-7.2.13+deb14-amd64\n"
           "  Depends: linux-modules-7.1.4+deb14-amd64\n  Depends: kmod\n"
           "  Recommends: firmware-linux-free\n")
    assert kernel.companion_packages(out, image) == [
        "linux-binary-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64"]
    # a 6.x image package carries its files itself
    assert kernel.companion_packages("x\n  Depends: kmod\n  Depends: initramfs-tools\n",
                                     "linux-image-6.12.117+deb13-amd64") == []


def test_suite_for_each_version_and_an_unknown_one():
    assert [kernel.suite_for(v) for v in ("5.10", "6.1", "6.12", "7.2")] == [
        "bullseye", "bookworm", "trixie", "sid"]
    with pytest.raises(LabError, match="unknown kernel"):
        kernel.suite_for("4.19")


def test_kernel_list_default_order_and_errors():
    assert kernel_list(None) == [kernel.DEFAULT_VERSION] == ["6.1"]
    assert kernel_list("6.12, 6.1,6.12") == ["6.12", "6.1"]
    with pytest.raises(LabError, match="unknown kernel"):
        kernel_list("6.1,6.13")


def _ready(base, package, kver):
    work = base / package
    (work / "kroot").mkdir(parents=True)
    (work / "READY").write_text(kver + "\n")


def test_cached_kernel_is_chosen_by_version(tmp_path):
    _ready(tmp_path, "linux-image-6.1.0-56-amd64", "6.1.0-56-amd64")
    _ready(tmp_path, "linux-image-6.12.117+deb13-amd64", "6.12.117+deb13-amd64")
    assert kernel._cached(tmp_path, "6.1").package == "linux-image-6.1.0-56-amd64"
    assert kernel._cached(tmp_path, "6.12").kver == "6.12.117+deb13-amd64"
    assert kernel._cached(tmp_path, "7.2") is None


def test_usr_lib_modules_is_linked_for_depmod_and_is_the_modules_dir(tmp_path):
    kver = "6.12.117+deb13-amd64"
    (tmp_path / "usr" / "lib" / "modules" / kver).mkdir(parents=True)
    assert kernel._unpacked_kver(tmp_path, "p") == kver
    assert (tmp_path / "lib" / "modules").is_symlink()
    k = kernel.Kernel("linux-image-6.12.117+deb13-amd64", kver, tmp_path)
    assert k.modules_dir == tmp_path / "usr" / "lib" / "modules" / kver
    assert k.version == "6.12"


def test_boot_image_is_the_bzimage_without_an_unpacked_vmlinux(tmp_path):
    k = kernel.Kernel("linux-image-6.12.1-amd64", "6.12.1-amd64", tmp_path / "kroot")
    assert k.boot_image == tmp_path / "bzImage"
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    assert k.boot_image == tmp_path / "vmlinux"


def test_builtin_modules_are_those_without_a_module_file(tmp_path):
    kver = "7.2.13+deb14-amd64"
    mods = tmp_path / "usr" / "lib" / "modules" / kver
    (mods / "kernel" / "fs").mkdir(parents=True)
    for name in ("9pnet_virtio.ko.xz", "9p.ko.xz", "overlay.ko.xz"):
        (mods / "kernel" / "fs" / name).write_bytes(b"")
    k = kernel.Kernel("linux-image-" + kver, kver, tmp_path)
    assert kernel._builtin_modules(k) == {"virtio_pci"}


def _gate_args(argv):
    """gate_runs of the arguments ``nvmeof-mp lab gate ARGV`` parses to."""
    from nvmeof_mp.lab import __main__ as lab
    args = lab.parser().parse_args(["gate", *argv])
    return lab.gate_runs(args)


def test_gate_runs_one_vm_per_kernel_and_setting():
    both = ("user", "root")
    assert _gate_args(["--kernel", "6.1,6.12", "--nvme-multipath", "Y"]) == [
        ("6.1", "Y", False, both), ("6.12", "Y", False, both)]
    assert _gate_args(["--kernel", "7.2", "--smoke", "--passes", "user"]) == [
        ("7.2", "Y", True, ("user",)), ("7.2", "N", True, ("user",))]
    assert _gate_args([]) == [("6.1", "Y", False, both), ("6.1", "N", False, both)]


def test_gate_matrix_covers_every_kernel_and_6_1_fully():
    runs = _gate_args(["--matrix"])
    assert {run[0] for run in runs} == set(kernel.SUITES)
    full = {(v, mp): passes for v, mp, smoke, passes in runs if not smoke}
    assert full[("6.1", "Y")][0].startswith("user") and full[("6.1", "Y")][1].startswith("root")
    assert full[("6.1", "N")][0].startswith("user") and "6.12" in {v for v, _ in full}
