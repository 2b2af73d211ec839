"""callstate: Stringee call events in, live call state and one final call record per call out."""
