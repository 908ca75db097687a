"""Bottom layer: the typed configuration (every field with its help, validated once), hardware profiles and their resolution into one Config, and the one error type a user sees."""
