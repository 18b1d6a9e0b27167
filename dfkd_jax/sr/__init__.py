"""Super-resolution: MATLAB-compatible resizing and colour conversion (``ops``), HR images,
patches and PSNR/SSIM evaluation (``evaluation``)."""
