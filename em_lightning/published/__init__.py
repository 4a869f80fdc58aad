"""Base layer: the published data formats (question files, judge prompts, judged answers), the registry of published files pinned by commit and checksum, and their fetching."""
