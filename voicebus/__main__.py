from voicebus.cli import main

main()
