import pytest

from tq_vllm.version import UnsupportedVllmVersion, check_vllm_version, installed_vllm_version, parse_version


def test_parse():
    assert parse_version("0.32.0+cpu") == (0, 32, 0)
    assert parse_version("0.33.1rc2") == (0, 33, 1)


def test_installed_vllm_is_supported():
    assert check_vllm_version(installed_vllm_version())[:2] == (0, 32)


@pytest.mark.parametrize("v", ["0.31.9", "0.33.0", "1.0.0"])
def test_unsupported_versions_raise_naming_the_range(v):
    with pytest.raises(UnsupportedVllmVersion, match=">= 0.32, < 0.33"):
        check_vllm_version(v)
