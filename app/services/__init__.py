"""The serving layer: routers stay thin and hand work to these services.

- ``wiring``: build the LLM backend and retrievers from the settings (shared with the CLI).
- ``collections``: tenant-namespaced collections, documents and ingestion jobs
  (every write runs serially on one writer thread).
- ``sessions``: chat sessions and their history in the database.
- ``chat``: RAG, agent and plain-LLM turns as one stream of events.
"""
