"""The client's machinery, behind :class:`ipcbus.IpcBusClient` (``ipcbus/client.py``).

One module per concern; the concurrency model is on one page at the top of
``connection.py``:

* ``connection.py``: one process's connection to one bus, shared by its clients: the two I/O
  threads (reader, dispatcher), frame intake (descriptors, answers, notices), nested
  dispatch, the end;
* ``inbox.py``: the read/dispatch scheduling as a pure unit (who reads, who dispatches, the
  hand-over, the dispatch queue and its byte budget), tested with an injected clock;
* ``fastpath.py``: the wake-free round trip, one switch (``IPCBUS_FAST_PATH``): a blocking
  caller reads its own answer, a responder's reader polls after its process answered;
* ``writer.py``: writing frames (the send lock, coalesced bursts, memberships);
* ``requests.py``: requests in flight (the shared ``RequestTable``), how callers wait;
* ``answers.py``: what a caller waits on, and an answer frame turned into its outcome;
* ``gathering.py``: ``request_all``, every receiver's answer gathered;
* ``cancels.py``: the requests delivered here and not answered yet, so a CANCEL reaches
  their listeners (``event.request.cancelled``, ``on_cancel``);
* ``delivery.py``: a received frame to the listeners of this process's clients;
* ``joining.py``: a client joining the bus (PEER_ADD, the hub's record) and leaving it;
* ``opening.py``: finding or opening the process's connection for ``connect()`` (the shared
  ``ConnectionRegistry``);
* ``reconnect.py``: the reconnection policy and a client's link state machine (pure, clock
  injected); ``reconnecting.py``: the retry thread, the client's ``on_closed`` /
  ``on_disconnected`` / ``on_reconnected`` handlers and ``wait_connected()``.

Nothing here imports ``ipcbus.client``: what the machinery needs of a client is a Protocol
(``delivery.LocalClient``, ``joining.Joiner``).
"""
