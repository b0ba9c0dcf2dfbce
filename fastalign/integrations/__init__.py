"""fastalign under other libraries' trainers.

- :mod:`fastalign.integrations.trl`: TRL's trainers compute their per-token log-probs and
  entropy through fastalign's fused head (``enable()`` / ``patch(trainer)``).

Each integration is imported on its own (``import fastalign.integrations.trl``), so fastalign
itself never imports TRL.
"""
