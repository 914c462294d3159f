"""The message bus on Redis Streams: keys, codecs, producer, consumer groups, dead letters."""
