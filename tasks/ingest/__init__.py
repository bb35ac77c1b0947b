"""Finding studies: listing, header reading, grouping, identity checks, the PHI guard."""
