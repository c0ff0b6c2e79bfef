"""seqlab.domains.memory: agent memory streams: events (role, content, time, metadata) as one byte stream a
byte-level model reads.

Each event is encoded as

    0xF5 role 0xF6 time 0xF7 metadata 0xF8 content 0xF9

where role and content are UTF-8 text, time is the decimal ``repr`` of a float (seconds since the Unix epoch,
UTC), and metadata is a compact JSON object or nothing at all (``None``). The five markers 0xF5..0xF9 are bytes
that never occur in valid UTF-8, so content can be any text with no escaping, and the stream is unambiguous:
an event is complete exactly when its 0xF9 has arrived. Events are encoded independently, so encoding them one
by one and concatenating equals encoding the list at once: a running model state can be fed each new event as
it happens. The vocabulary is the 256 byte values, the same as ``ByteAdapter``, so a byte model can be
fine-tuned on memory streams. The metric is bits per byte (uniform baseline 8).

On disk a memory stream is JSON Lines (one event object per line, ``.jsonl``, the default) or the encoded bytes
themselves (``format="stream"``, the default for ``.mem`` files). See docs/domains/memory.md.

Package layout: ``events.py`` (``Event``, the encoding), ``decoder.py`` (``StreamDecoder``), ``files.py`` (JSON
Lines and ``.mem`` files), ``adapter.py`` (``MemoryStreamAdapter``).
"""

from .adapter import MemoryStreamAdapter
from .decoder import StreamDecoder
from .events import CONTENT, END, EVENT, META, TIME, Event, encode_event

__all__ = ["CONTENT", "END", "EVENT", "META", "TIME", "Event", "MemoryStreamAdapter", "StreamDecoder", "encode_event"]
