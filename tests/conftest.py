import pytest

from simlab import Lab


@pytest.fixture
def lab(tmp_path):
    return Lab(tmp_path)


@pytest.fixture
def make_lab(tmp_path):
    def make(**kwargs):
        return Lab(tmp_path, **kwargs)
    return make
