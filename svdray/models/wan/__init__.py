"""Wan image-to-video (Wan2.1-I2V-14B, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B): the family is
`svdray.models.wan.family.WanFamily`."""
