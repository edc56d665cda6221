"""asyncio glue below the daemons: pumps, carriers, links (SSH, TCP, TLS), socket options."""
