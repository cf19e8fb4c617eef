"""Bottom layer: config, errors, image IO, files, small utilities; imports no other layer."""
