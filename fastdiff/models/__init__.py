"""fastdiff native models: UNet (diffusers UNet2D / UNet2DCondition layouts) and DiT."""
