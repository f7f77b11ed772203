import pytest
from PIL import Image

from longcat_ray.buckets import bucket_for, fit_to_bucket


@pytest.mark.parametrize(
    "size,area,expected",
    [((1024, 1024), 768**2, (768, 768)), ((1920, 1080), 768**2, (1024, 576)), ((1080, 1920), 768**2, (576, 1024)),
     ((224, 144), 128**2, (192, 128)), ((144, 224), 128**2, (128, 192)), ((160, 160), 128**2, (128, 128))],
)
def test_buckets_are_on_the_grid_and_keep_the_ratio(size, area, expected):
    w, h = bucket_for(*size, area)
    assert w % 64 == 0 and h % 64 == 0
    assert (w, h) == expected


def test_fit_to_bucket_crops_to_exact_size_without_distortion():
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue strip on the left that a centre crop removes
    fitted = fit_to_bucket(image, 128, 64)
    assert fitted.size == (128, 64)
    assert fitted.getpixel((0, 32))[2] < 50 and fitted.getpixel((0, 32))[0] > 200


def test_extreme_ratio_stays_on_grid():
    w, h = bucket_for(100, 5000, 128**2)
    assert w == 64 and h % 64 == 0 and h > w
