"""Training objectives of the tokenizer: DiffAugment, the DINO discriminator and the GAN losses."""
