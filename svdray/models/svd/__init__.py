"""Stable Video Diffusion (SVD / SVD-XT): the family is `svdray.models.svd.family.SVDFamily`."""
