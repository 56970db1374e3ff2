"""Opens and clicks: tracking keys and links (made as messages are rendered), the public endpoints'
lookups and their group-committed recording, and the engagement counters they feed."""
