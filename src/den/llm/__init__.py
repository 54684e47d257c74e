"""The LLM gateway: an OpenAI-compatible API on the metadata service that
forwards a workspace's requests to the providers an admin configured, with
the provider keys kept on the host and each owner's daily budgets enforced.

- :mod:`den.llm.budget`: daily budgets, usage counts, in-flight limits.
- :mod:`den.llm.gateway`: the HTTP handlers and the forwarding to upstreams.
- :mod:`den.services.llm`: the admin and usage methods of the registry.
"""
