"""Authenticated gRPC over TCP: the one implementation every strata TCP listener uses.

* :mod:`csi.peers.tls` — server credentials from PEM files (reloaded when a Secret mount
  rotates them), a TLS listener, client channels with a bearer token per call.
* :mod:`csi.peers.auth` — the caller's Kubernetes ServiceAccount token (metadata
  ``authorization: Bearer …``) checked with a TokenReview (audience configurable), as a
  server interceptor that hands the handler a :class:`~csi.peers.auth.Caller` and takes an
  authorizer callback (:func:`~csi.peers.auth.allow_service_accounts` for node-to-node
  calls); SubjectAccessReviews for per-object decisions.
* :mod:`csi.peers.snapshots` — VolumeSnapshot namespace/name -> CSI snapshot handle through
  the API (VolumeSnapshot -> VolumeSnapshotContent), as external-snapshot-metadata does.

Users: the Diff export service's TCP listener (:mod:`csi.services.export`) and the
node-to-node channel (issue 12).
"""
