"""The embedded demo world and demo model: easy-vqa questions, rendered images, text facts, and the small LLaVA
trained once and cached (design.md §7)."""
