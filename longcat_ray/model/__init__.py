"""LongCat-Image-Edit model math and loading. Never imports ray, deepspeed or torch.distributed."""
