"""Write `src/lfm/edit/data/lifelong.jsonl`: edit requests for lifelong editing, from templates.

    .venv/bin/python tools/make_lifelong_facts.py            # rewrites the packaged file
    .venv/bin/python tools/make_lifelong_facts.py --check    # exits 1 if the file is stale

Each relation below is a table of (subject, true object) pairs written out by hand — only pairs
that are facts — and three templates: the prompt and two paraphrases, each ending where the
object comes. A record (the packaged fact schema, `lfm.edit.facts`) gets a counterfactual `new`
object drawn from the relation's other objects, up to five neighbourhood prompts (other subjects
of the relation with the same true object; none where no other subject shares it) and a `split`,
`train` (about 40 %) or `test`, for a meta-learned editor. Everything random is drawn from one
seeded generator, so the output is the same on every run. The cities of `EXTRA_CITIES`, added
later, follow as `test` records from a second seeded generator, leaving the first records as
they were.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/lfm/edit/data/lifelong.jsonl"
SEED, TRAIN_SHARE, NEIGHBOURS = 20250520, 0.4, 5

# relation: (prompt, paraphrase 1, paraphrase 2); "{}" is the subject
TEMPLATES = {
    "country-capital": (
        "The capital of {} is the city of",
        "The capital city of {} is",
        "The seat of government of {} is the city of",
    ),
    "city-country": (
        "{} is a city in the country of",
        "{} is located in the country of",
        "The country where {} lies is",
    ),
    "landmark-city": (
        "{} is located in the city of",
        "{} can be found in the city of",
        "The city that is home to {} is",
    ),
    "country-continent": (
        "{} is a country on the continent of",
        "{} is located on the continent of",
        "The continent where {} lies is",
    ),
    "country-language": (
        "The official language of {} is",
        "In {}, the official language is",
        "The language of government in {} is",
    ),
    "country-currency": (
        "The currency of {} is the",
        "The official currency of {} is the",
        "In {}, people pay with the",
    ),
    "company-city": (
        "The company {} is headquartered in the city of",
        "{} has its headquarters in the city of",
        "The head office of {} is in the city of",
    ),
    "club-city": (
        "{} is a sports club based in the city of",
        "{} is a sports team from the city of",
        "The home city of {} is",
    ),
}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "the United Kingdom": "London", "Ireland": "Dublin",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Austria": "Vienna",
    "Hungary": "Budapest", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Slovakia": "Bratislava", "Denmark": "Copenhagen", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Greece": "Athens", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovenia": "Ljubljana",
    "Ukraine": "Kyiv", "Russia": "Moscow", "Lithuania": "Vilnius", "Latvia": "Riga",
    "Estonia": "Tallinn", "Albania": "Tirana", "Belarus": "Minsk", "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul", "North Korea": "Pyongyang",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "the Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Afghanistan": "Kabul",
    "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Qatar": "Doha", "Yemen": "Sanaa",
    "Oman": "Muscat", "Kuwait": "Kuwait City", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Mongolia": "Ulaanbaatar", "Uzbekistan": "Tashkent",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Senegal": "Dakar", "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis",
    "Libya": "Tripoli", "Sudan": "Khartoum", "Uganda": "Kampala", "Zimbabwe": "Harare",
    "Zambia": "Lusaka", "Angola": "Luanda", "Mali": "Bamako", "Rwanda": "Kigali",
    "Madagascar": "Antananarivo", "Mexico": "Mexico City", "Cuba": "Havana",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogotá",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asunción", "Canada": "Ottawa", "Brazil": "Brasília", "Australia": "Canberra",
    "New Zealand": "Wellington", "Jamaica": "Kingston", "Nicaragua": "Managua",
    "Panama": "Panama City", "Costa Rica": "San José",
}  # fmt: skip

CITIES = {
    "France": ["Lyon", "Marseille", "Toulouse", "Nice", "Bordeaux", "Lille", "Nantes", "Strasbourg", "Montpellier", "Rennes", "Reims", "Grenoble", "Dijon", "Avignon", "Cannes"],
    "Germany": ["Munich", "Hamburg", "Cologne", "Frankfurt", "Stuttgart", "Düsseldorf", "Dresden", "Leipzig", "Hanover", "Nuremberg", "Bremen", "Bonn", "Heidelberg", "Dortmund", "Freiburg"],
    "Italy": ["Milan", "Naples", "Turin", "Florence", "Venice", "Bologna", "Genoa", "Palermo", "Verona", "Pisa", "Bari", "Catania", "Siena", "Padua", "Trieste"],
    "Spain": ["Barcelona", "Valencia", "Seville", "Bilbao", "Málaga", "Zaragoza", "Granada", "Córdoba", "Salamanca", "Toledo", "Alicante", "Pamplona"],
    "the United Kingdom": ["Manchester", "Liverpool", "Birmingham", "Leeds", "Glasgow", "Edinburgh", "Bristol", "Cardiff", "Belfast", "Oxford", "Sheffield", "Newcastle upon Tyne", "Nottingham", "Aberdeen"],
    "the United States": ["Chicago", "Los Angeles", "Houston", "Boston", "Seattle", "San Francisco", "Miami", "Denver", "Atlanta", "Philadelphia", "Dallas", "Detroit", "Phoenix", "New Orleans", "Las Vegas", "San Diego", "Portland", "Nashville", "Pittsburgh", "Minneapolis"],
    "Japan": ["Osaka", "Kyoto", "Yokohama", "Nagoya", "Sapporo", "Kobe", "Fukuoka", "Hiroshima", "Sendai", "Nara", "Kawasaki", "Nagasaki"],
    "China": ["Shanghai", "Guangzhou", "Shenzhen", "Chengdu", "Wuhan", "Nanjing", "Hangzhou", "Xi'an", "Chongqing", "Tianjin", "Suzhou", "Harbin"],
    "India": ["Mumbai", "Delhi", "Bangalore", "Chennai", "Kolkata", "Hyderabad", "Pune", "Ahmedabad", "Jaipur", "Lucknow", "Varanasi", "Agra"],
    "Canada": ["Toronto", "Montreal", "Vancouver", "Calgary", "Edmonton", "Winnipeg", "Quebec City", "Halifax"],
    "Australia": ["Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Hobart", "Darwin", "Cairns", "Gold Coast"],
    "Brazil": ["São Paulo", "Rio de Janeiro", "Salvador", "Fortaleza", "Belo Horizonte", "Manaus", "Recife", "Porto Alegre", "Curitiba"],
    "Russia": ["Saint Petersburg", "Novosibirsk", "Yekaterinburg", "Kazan", "Vladivostok", "Sochi", "Murmansk", "Omsk", "Samara"],
    "Mexico": ["Guadalajara", "Monterrey", "Puebla", "Tijuana", "Cancún", "Acapulco", "Oaxaca", "Mérida"],
    "Turkey": ["Istanbul", "Izmir", "Antalya", "Bursa", "Konya", "Trabzon"],
    "the Netherlands": ["Rotterdam", "Utrecht", "Eindhoven", "Groningen", "Maastricht", "Leiden", "Haarlem", "Delft"],
    "Poland": ["Kraków", "Gdańsk", "Wrocław", "Poznań", "Łódź", "Lublin"],
    "Sweden": ["Gothenburg", "Malmö", "Uppsala", "Linköping", "Örebro"],
    "Norway": ["Bergen", "Trondheim", "Stavanger", "Tromsø"],
    "Switzerland": ["Zurich", "Geneva", "Basel", "Lausanne", "Lucerne"],
    "Austria": ["Salzburg", "Innsbruck", "Graz", "Linz"],
    "Belgium": ["Antwerp", "Ghent", "Bruges", "Liège"],
    "Portugal": ["Porto", "Coimbra", "Braga", "Faro"],
    "Greece": ["Thessaloniki", "Patras", "Heraklion"],
    "Egypt": ["Alexandria", "Luxor", "Aswan", "Giza"],
    "South Africa": ["Johannesburg", "Cape Town", "Durban", "Pretoria"],
    "Argentina": ["Rosario", "Mendoza", "Mar del Plata"],
    "South Korea": ["Busan", "Incheon", "Daegu", "Gwangju"],
    "Vietnam": ["Ho Chi Minh City", "Da Nang", "Hue", "Haiphong"],
    "Pakistan": ["Karachi", "Lahore", "Peshawar", "Rawalpindi"],
    "Morocco": ["Casablanca", "Marrakesh", "Fez", "Tangier"],
    "Indonesia": ["Surabaya", "Bandung", "Medan", "Yogyakarta"],
    "Colombia": ["Medellín", "Cali", "Cartagena", "Barranquilla"],
    "Thailand": ["Chiang Mai", "Phuket", "Pattaya"],
    "Ukraine": ["Odesa", "Kharkiv", "Lviv", "Dnipro"],
    "Israel": ["Tel Aviv", "Haifa", "Eilat"],
    "Finland": ["Tampere", "Turku", "Espoo", "Oulu"],
    "Denmark": ["Aarhus", "Odense", "Aalborg"],
    "Ireland": ["Cork", "Galway", "Limerick"],
    "Chile": ["Valparaíso", "Concepción", "Antofagasta"],
    "Peru": ["Cusco", "Arequipa", "Trujillo"],
    "New Zealand": ["Auckland", "Christchurch", "Dunedin", "Queenstown"],
    "Nigeria": ["Lagos", "Kano", "Ibadan"],
    "Kenya": ["Mombasa", "Kisumu", "Nakuru"],
    "Saudi Arabia": ["Jeddah", "Mecca", "Medina", "Dammam"],
    "the United Arab Emirates": ["Dubai", "Sharjah"],
    "the Czech Republic": ["Brno", "Ostrava", "Plzeň"],
    "Hungary": ["Debrecen", "Szeged", "Pécs"],
    "Romania": ["Cluj-Napoca", "Timișoara", "Iași", "Constanța"],
    "Croatia": ["Split", "Dubrovnik", "Rijeka"],
    "Iran": ["Isfahan", "Shiraz", "Tabriz", "Mashhad"],
}  # fmt: skip

LANDMARKS = {
    "Paris": ["the Eiffel Tower", "the Louvre", "Notre-Dame Cathedral", "the Arc de Triomphe", "the Sacré-Cœur Basilica", "the Musée d'Orsay", "the Panthéon", "the Centre Pompidou"],
    "London": ["Big Ben", "the Tower of London", "Buckingham Palace", "Westminster Abbey", "Tower Bridge", "the British Museum", "St Paul's Cathedral", "Trafalgar Square", "the London Eye"],
    "Rome": ["the Colosseum", "the Pantheon", "the Trevi Fountain", "the Roman Forum", "the Spanish Steps", "the Circus Maximus", "the Baths of Caracalla"],
    "New York City": ["the Statue of Liberty", "the Empire State Building", "Central Park", "Times Square", "the Brooklyn Bridge", "Wall Street", "the Metropolitan Museum of Art", "Rockefeller Center", "the Chrysler Building", "Grand Central Terminal"],
    "Berlin": ["the Brandenburg Gate", "the Reichstag building", "Checkpoint Charlie", "the Berlin Cathedral", "Museum Island", "Alexanderplatz"],
    "Barcelona": ["the Sagrada Família", "Park Güell", "Casa Batlló", "Camp Nou", "La Rambla", "Casa Milà"],
    "Madrid": ["the Prado Museum", "the Royal Palace of Madrid", "Retiro Park", "Puerta del Sol", "the Santiago Bernabéu Stadium"],
    "Moscow": ["the Kremlin", "Red Square", "Saint Basil's Cathedral", "the Bolshoi Theatre", "Gorky Park"],
    "Sydney": ["the Sydney Opera House", "the Sydney Harbour Bridge", "Bondi Beach", "Darling Harbour"],
    "Tokyo": ["the Tokyo Skytree", "the Senso-ji Temple", "the Meiji Shrine", "the Shibuya Crossing", "Tokyo Tower"],
    "Beijing": ["the Forbidden City", "Tiananmen Square", "the Temple of Heaven", "the Summer Palace"],
    "Istanbul": ["the Hagia Sophia", "the Blue Mosque", "the Topkapı Palace", "the Grand Bazaar", "the Galata Tower"],
    "Athens": ["the Acropolis", "the Parthenon", "the Temple of Olympian Zeus", "the Erechtheion"],
    "Amsterdam": ["the Rijksmuseum", "the Anne Frank House", "the Van Gogh Museum", "Vondelpark"],
    "Venice": ["St Mark's Basilica", "the Rialto Bridge", "the Doge's Palace"],
    "Florence": ["the Uffizi Gallery", "the Ponte Vecchio", "the Palazzo Vecchio", "Florence Cathedral"],
    "Vienna": ["Schönbrunn Palace", "St. Stephen's Cathedral", "the Hofburg", "the Belvedere Palace"],
    "Prague": ["Charles Bridge", "Prague Castle", "the Old Town Square", "St. Vitus Cathedral"],
    "Washington, D.C.": ["the White House", "the Lincoln Memorial", "the Washington Monument", "the United States Capitol", "the Smithsonian Institution"],
    "San Francisco": ["the Golden Gate Bridge", "Alcatraz Island", "Fisherman's Wharf", "Lombard Street"],
    "Rio de Janeiro": ["Christ the Redeemer", "Sugarloaf Mountain", "Copacabana Beach", "the Maracanã Stadium"],
    "Cairo": ["the Egyptian Museum", "the Cairo Citadel", "Al-Azhar Mosque", "Khan el-Khalili"],
    "Dubai": ["the Burj Khalifa", "the Burj Al Arab", "the Palm Jumeirah", "the Dubai Mall"],
    "Agra": ["the Taj Mahal", "Agra Fort", "Itmad-ud-Daulah's Tomb"],
    "Kyoto": ["the Kinkaku-ji Temple", "the Fushimi Inari Shrine", "the Kiyomizu-dera Temple", "Nijō Castle"],
    "Saint Petersburg": ["the Hermitage Museum", "the Winter Palace", "the Church of the Savior on Spilled Blood", "the Peter and Paul Fortress"],
    "Pisa": ["the Leaning Tower of Pisa", "Pisa Cathedral"],
    "Seattle": ["the Space Needle", "Pike Place Market"],
    "Chicago": ["Willis Tower", "Millennium Park", "Wrigley Field", "the Art Institute of Chicago"],
    "Los Angeles": ["the Hollywood Sign", "the Griffith Observatory", "the Getty Center", "Dodger Stadium"],
    "Edinburgh": ["Edinburgh Castle", "Holyrood Palace", "the Royal Mile", "Arthur's Seat"],
    "Munich": ["the Marienplatz", "the Nymphenburg Palace", "the Englischer Garten", "the Allianz Arena"],
    "Budapest": ["the Hungarian Parliament Building", "Buda Castle", "the Széchenyi Chain Bridge", "Fisherman's Bastion"],
    "Lisbon": ["the Belém Tower", "the Jerónimos Monastery", "São Jorge Castle"],
    "Singapore": ["Marina Bay Sands", "Gardens by the Bay", "the Merlion Park"],
    "Toronto": ["the CN Tower", "Casa Loma", "the Royal Ontario Museum"],
    "Jerusalem": ["the Western Wall", "the Dome of the Rock", "the Church of the Holy Sepulchre"],
    "Mexico City": ["the Zócalo", "the Palacio de Bellas Artes", "Chapultepec Castle"],
    "Buenos Aires": ["the Casa Rosada", "the Teatro Colón", "the Obelisco de Buenos Aires"],
    "Seoul": ["Gyeongbokgung Palace", "N Seoul Tower", "Changdeokgung Palace"],
    "Brussels": ["the Atomium", "the Grand-Place", "the Manneken Pis"],
    "Copenhagen": ["the Little Mermaid statue", "Tivoli Gardens", "Nyhavn"],
    "Stockholm": ["the Vasa Museum", "Gamla stan", "Stockholm City Hall"],
    "Dublin": ["Trinity College Dublin", "the Guinness Storehouse"],
    "Milan": ["Milan Cathedral", "La Scala", "the Galleria Vittorio Emanuele II", "Sforza Castle"],
    "Naples": ["Castel Nuovo", "Naples Cathedral", "the Royal Palace of Naples"],
    "Bangkok": ["Wat Arun", "the Grand Palace", "Wat Pho"],
    "Granada": ["the Alhambra", "the Generalife"],
    "Seville": ["the Alcázar of Seville", "Seville Cathedral", "the Plaza de España in Seville"],
}  # fmt: skip

CONTINENTS = {
    "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Sweden", "Norway", "Portugal", "Greece", "Austria", "Hungary", "Denmark", "Finland", "Ireland", "Belgium", "the Netherlands", "Switzerland", "Romania", "Bulgaria", "Croatia", "Serbia", "Slovakia", "Slovenia", "Lithuania", "Latvia", "Estonia", "Iceland", "Albania", "Luxembourg", "Ukraine", "Belarus", "Moldova", "Montenegro", "North Macedonia", "Bosnia and Herzegovina", "Malta"],
    "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "South Korea", "North Korea", "Indonesia", "Malaysia", "the Philippines", "Pakistan", "Bangladesh", "Nepal", "Mongolia", "Cambodia", "Laos", "Myanmar", "Sri Lanka", "Iran", "Iraq", "Saudi Arabia", "Jordan", "Syria", "Lebanon", "Israel", "Afghanistan", "Kazakhstan", "Uzbekistan", "Bhutan", "Qatar", "Oman", "Yemen", "Kuwait", "Singapore"],
    "Africa": ["Egypt", "Nigeria", "Kenya", "Ethiopia", "Ghana", "Morocco", "Algeria", "Tunisia", "South Africa", "Senegal", "Uganda", "Tanzania", "Zimbabwe", "Zambia", "Angola", "Mali", "Sudan", "Libya", "Rwanda", "Madagascar", "Namibia", "Botswana", "Mozambique", "Cameroon", "Somalia", "Niger", "Chad"],
    "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador", "Bolivia", "Uruguay", "Paraguay", "Guyana", "Suriname"],
    "North America": ["Canada", "Mexico", "the United States", "Cuba", "Guatemala", "Honduras", "Nicaragua", "Costa Rica", "Panama", "Jamaica", "Haiti", "El Salvador", "Belize"],
    "Oceania": ["Australia", "New Zealand", "Fiji", "Papua New Guinea", "Samoa", "Tonga", "Vanuatu"],
}  # fmt: skip

LANGUAGES = {
    "French": ["France", "Senegal", "Ivory Coast", "Guinea", "Monaco", "Benin", "Togo", "Gabon"],
    "Spanish": ["Spain", "Colombia", "Venezuela", "Ecuador", "Cuba", "Costa Rica", "Guatemala", "Honduras", "Nicaragua", "El Salvador", "the Dominican Republic", "Panama"],
    "Portuguese": ["Portugal", "Brazil", "Angola", "Mozambique", "Cape Verde", "Guinea-Bissau"],
    "German": ["Germany", "Austria", "Liechtenstein"],
    "Arabic": ["Saudi Arabia", "Egypt", "Jordan", "Syria", "Iraq", "Kuwait", "Qatar", "Oman", "Yemen", "Libya", "the United Arab Emirates", "Bahrain"],
    "Italian": ["Italy", "San Marino"],
    "Dutch": ["the Netherlands", "Suriname"],
    "English": ["Jamaica", "Ghana", "Nigeria", "Liberia"],
    "Russian": ["Russia", "Belarus"],
    "Greek": ["Greece", "Cyprus"],
    "Polish": ["Poland"], "Hungarian": ["Hungary"],
    "Norwegian": ["Norway"], "Finnish": ["Finland"],
    "Turkish": ["Turkey"], "Romanian": ["Romania"],
    "Ukrainian": ["Ukraine"], "Korean": ["South Korea", "North Korea"], "Thai": ["Thailand"],
    "Vietnamese": ["Vietnam"], "Persian": ["Iran"], "Hebrew": ["Israel"], "Icelandic": ["Iceland"],
}  # fmt: skip

CURRENCIES = {
    "euro": ["Germany", "France", "Italy", "Spain", "Portugal", "the Netherlands", "Belgium", "Austria", "Ireland", "Finland", "Greece", "Slovakia", "Slovenia", "Estonia", "Latvia", "Lithuania", "Luxembourg", "Malta", "Cyprus"],
    "yen": ["Japan"], "won": ["South Korea", "North Korea"], "rupee": ["India", "Pakistan", "Sri Lanka", "Nepal"],
    "ruble": ["Russia", "Belarus"], "yuan": ["China"], "baht": ["Thailand"], "dong": ["Vietnam"],
    "peso": ["Mexico", "Argentina", "Chile", "Colombia", "the Philippines", "Cuba", "Uruguay", "the Dominican Republic"],
    "real": ["Brazil"], "rand": ["South Africa"], "lira": ["Turkey"], "zloty": ["Poland"],
    "forint": ["Hungary"], "krona": ["Sweden", "Iceland"], "krone": ["Norway", "Denmark"],
    "shekel": ["Israel"], "rial": ["Iran", "Oman", "Yemen"], "riyal": ["Saudi Arabia", "Qatar"],
    "dinar": ["Serbia", "Algeria", "Tunisia", "Jordan", "Kuwait", "Iraq", "Libya", "Bahrain"],
    "dollar": ["the United States", "Canada", "Australia", "New Zealand", "Singapore", "Jamaica"],
    "naira": ["Nigeria"], "shilling": ["Kenya", "Uganda", "Tanzania", "Somalia"],
    "dirham": ["Morocco", "the United Arab Emirates"],
}  # fmt: skip

COMPANY_CITIES = {
    "Cupertino": ["Apple"], "Mountain View": ["Google"], "Redmond": ["Microsoft", "Nintendo of America"],
    "Seattle": ["Amazon", "Starbucks"], "Santa Clara": ["Intel", "Nvidia"],
    "Atlanta": ["Coca-Cola", "Delta Air Lines"], "Dearborn": ["Ford"],
    "Detroit": ["General Motors"], "Bentonville": ["Walmart"], "Beaverton": ["Nike"],
    "Armonk": ["IBM"], "Los Gatos": ["Netflix"], "Palo Alto": ["HP Inc."],
    "San Francisco": ["Salesforce", "Uber", "Airbnb", "Levi Strauss & Co."],
    "Chicago": ["McDonald's", "United Airlines"], "Cincinnati": ["Procter & Gamble", "Kroger"],
    "Memphis": ["FedEx"], "Burbank": ["the Walt Disney Company"], "San Diego": ["Qualcomm"],
    "Minneapolis": ["Target Corporation"], "Round Rock": ["Dell"],
    "Kyoto": ["Nintendo", "Kyocera"], "Yokohama": ["Nissan"],
    "Tokyo": ["Sony", "Honda", "Rakuten"], "Seoul": ["Hyundai", "Kia", "LG"],
    "Hangzhou": ["Alibaba"], "Shenzhen": ["Tencent", "Huawei", "BYD"], "Beijing": ["Baidu", "Xiaomi", "ByteDance"],
    "Wolfsburg": ["Volkswagen"], "Munich": ["BMW", "Siemens", "Allianz"],
    "Stuttgart": ["Mercedes-Benz", "Porsche"], "Herzogenaurach": ["Adidas", "Puma"],
    "Walldorf": ["SAP"], "Leverkusen": ["Bayer"], "Ludwigshafen": ["BASF"],
    "Frankfurt": ["Deutsche Bank", "Commerzbank"], "Cologne": ["Lufthansa"], "Ingolstadt": ["Audi"],
    "Vevey": ["Nestlé"], "Basel": ["Novartis", "Roche"], "Zurich": ["UBS"], "Geneva": ["Rolex"],
    "Amsterdam": ["Heineken", "Philips"], "Gothenburg": ["Volvo Cars"],
    "Stockholm": ["Ericsson", "Spotify", "H&M"], "Espoo": ["Nokia"], "Billund": ["LEGO"],
    "Copenhagen": ["Carlsberg", "Maersk"], "Maranello": ["Ferrari"], "Turin": ["Fiat"],
    "Milan": ["Pirelli", "Prada"], "Florence": ["Gucci"], "Clermont-Ferrand": ["Michelin"],
    "Paris": ["LVMH", "Hermès", "Danone"], "Madrid": ["Telefónica", "Iberia"],
    "London": ["Shell", "BP", "HSBC", "Unilever", "Burberry"], "Cambridge": ["Arm Holdings", "AstraZeneca"],
    "Dublin": ["Aer Lingus"], "Mumbai": ["Tata Motors", "Reliance Industries"],
    "Bangalore": ["Infosys", "Wipro"], "Dubai": ["Emirates"], "Doha": ["Qatar Airways"],
    "Abu Dhabi": ["Etihad Airways"], "Hong Kong": ["Cathay Pacific"], "Montreal": ["Bombardier"],
    "Waterloo": ["BlackBerry"], "Rio de Janeiro": ["Petrobras"],
    "Mladá Boleslav": ["Škoda Auto"], "Moscow": ["Aeroflot"],
}  # fmt: skip

CLUB_CITIES = {
    "London": ["Arsenal", "Chelsea", "Tottenham Hotspur", "West Ham United", "Fulham", "Crystal Palace"],
    "Manchester": ["Manchester United", "Manchester City"], "Liverpool": ["Liverpool FC", "Everton"],
    "Birmingham": ["Aston Villa"], "Newcastle upon Tyne": ["Newcastle United"], "Leeds": ["Leeds United"],
    "Glasgow": ["Celtic FC", "Rangers FC"], "Madrid": ["Real Madrid", "Atlético Madrid"],
    "Barcelona": ["FC Barcelona"], "Seville": ["Sevilla FC", "Real Betis"],
    "Valencia": ["Valencia CF"], "Bilbao": ["Athletic Bilbao"], "Munich": ["Bayern Munich", "TSV 1860 Munich"],
    "Dortmund": ["Borussia Dortmund"], "Gelsenkirchen": ["Schalke 04"], "Leverkusen": ["Bayer Leverkusen"],
    "Bremen": ["Werder Bremen"], "Hamburg": ["Hamburger SV", "FC St. Pauli"], "Stuttgart": ["VfB Stuttgart"],
    "Frankfurt": ["Eintracht Frankfurt"], "Turin": ["Juventus", "Torino"], "Milan": ["AC Milan", "Inter Milan"],
    "Rome": ["AS Roma", "Lazio"], "Naples": ["SSC Napoli"], "Florence": ["Fiorentina"], "Genoa": ["Genoa CFC", "Sampdoria"],
    "Paris": ["Paris Saint-Germain"], "Marseille": ["Olympique de Marseille"], "Lyon": ["Olympique Lyonnais"],
    "Amsterdam": ["Ajax"], "Eindhoven": ["PSV Eindhoven"], "Rotterdam": ["Feyenoord"],
    "Lisbon": ["Benfica", "Sporting CP"], "Porto": ["FC Porto"],
    "Istanbul": ["Galatasaray", "Fenerbahçe", "Beşiktaş"], "Athens": ["Panathinaikos", "AEK Athens"],
    "Belgrade": ["Red Star Belgrade", "Partizan Belgrade"], "Zagreb": ["Dinamo Zagreb"],
    "Prague": ["Sparta Prague", "Slavia Prague"], "Vienna": ["Rapid Vienna", "Austria Vienna"],
    "Moscow": ["Spartak Moscow", "CSKA Moscow"], "Kyiv": ["Dynamo Kyiv"], "Brussels": ["Anderlecht"],
    "Bruges": ["Club Brugge"], "Warsaw": ["Legia Warsaw"], "Copenhagen": ["FC Copenhagen"],
    "Basel": ["FC Basel"], "Buenos Aires": ["Boca Juniors", "River Plate"],
    "Rio de Janeiro": ["Flamengo", "Fluminense", "Vasco da Gama", "Botafogo"],
    "São Paulo": ["Corinthians", "Palmeiras", "São Paulo FC"],
    "Boston": ["the Boston Celtics", "the Boston Red Sox", "the Boston Bruins"],
    "Chicago": ["the Chicago Bulls", "the Chicago Cubs", "the Chicago Bears", "the Chicago White Sox"],
    "New York City": ["the New York Knicks", "the New York Yankees", "the New York Mets"],
    "Los Angeles": ["the Los Angeles Lakers", "the Los Angeles Dodgers", "the Los Angeles Clippers"],
    "Miami": ["the Miami Heat"], "Toronto": ["the Toronto Raptors", "the Toronto Maple Leafs", "the Toronto Blue Jays"],
    "Dallas": ["the Dallas Mavericks", "the Dallas Stars"], "Houston": ["the Houston Rockets", "the Houston Astros"],
    "Denver": ["the Denver Nuggets", "the Denver Broncos"], "Philadelphia": ["the Philadelphia 76ers", "the Philadelphia Eagles", "the Philadelphia Phillies"],
    "Detroit": ["the Detroit Pistons", "the Detroit Red Wings", "the Detroit Tigers"],
    "Milwaukee": ["the Milwaukee Bucks"], "Green Bay": ["the Green Bay Packers"],
    "Pittsburgh": ["the Pittsburgh Steelers", "the Pittsburgh Penguins"], "Seattle": ["the Seattle Seahawks", "the Seattle Mariners"],
    "Montreal": ["the Montreal Canadiens"],
}  # fmt: skip


# Added after the first 1,102 requests: more cities, every one a `test` request, numbered after
# them and drawn by a second seeded generator, so that the first 1,102 lines (and the train split a
# meta-learned editor was trained on) stay as they were. Only unambiguous names: a city whose name
# another country's city of note shares (Córdoba, Cartagena, Valencia, Hamilton, Victoria ...) is
# left out.
EXTRA_CITIES = {
    "Brazil": ["Belém", "Goiânia"],
    "South Korea": ["Daejeon", "Ulsan", "Suwon"],
    "Poland": ["Katowice", "Szczecin"],
    "Turkey": ["Adana", "Gaziantep"],
    "Egypt": ["Port Said", "Hurghada"],
    "South Africa": ["Bloemfontein", "Stellenbosch"],
    "Argentina": ["La Plata", "Salta", "Ushuaia"],
    "Sweden": ["Västerås", "Helsingborg", "Kiruna"],
    "Switzerland": ["Bern", "Lugano", "Winterthur"],
    "Belgium": ["Leuven", "Namur", "Charleroi", "Mechelen"],
    "Austria": ["Klagenfurt"],
    "Greece": ["Larissa", "Volos"],
    "Portugal": ["Aveiro", "Funchal", "Évora"],
    "Ireland": ["Waterford", "Kilkenny"],
    "Norway": ["Drammen", "Kristiansand"],
    "Denmark": ["Esbjerg", "Roskilde"],
    "Finland": ["Vantaa", "Rovaniemi"],
    "Indonesia": ["Semarang", "Makassar", "Denpasar"],
    "Vietnam": ["Nha Trang", "Can Tho"],
    "Thailand": ["Khon Kaen", "Hat Yai"],
    "Pakistan": ["Faisalabad", "Multan", "Quetta"],
    "Nigeria": ["Port Harcourt", "Benin City", "Kaduna"],
    "Kenya": ["Eldoret"],
    "Morocco": ["Agadir", "Meknes"],
    "Chile": ["Viña del Mar", "Temuco"],
    "Colombia": ["Bucaramanga", "Pereira"],
    "Peru": ["Chiclayo", "Iquitos", "Piura"],
    "New Zealand": ["Rotorua", "Tauranga"],
    "Iran": ["Yazd", "Qom"],
    "Saudi Arabia": ["Taif"],
    "Ukraine": ["Zaporizhzhia"],
    "the Czech Republic": ["Olomouc", "Liberec"],
    "Hungary": ["Győr", "Miskolc"],
    "Israel": ["Nazareth", "Beersheba"],
    "the Philippines": ["Cebu City", "Davao City", "Quezon City", "Baguio", "Zamboanga City"],
    "Malaysia": ["Johor Bahru", "Ipoh", "Kota Kinabalu", "Kuching", "Shah Alam"],
    "the United States": ["Austin", "Baltimore", "Cleveland", "Charlotte", "Sacramento", "Salt Lake City", "Honolulu", "Anchorage", "Orlando", "Tampa", "St. Louis", "Indianapolis", "Milwaukee", "Cincinnati", "Buffalo", "Memphis", "Oklahoma City", "Albuquerque", "Tucson", "Omaha", "Raleigh", "Louisville", "San Antonio", "Jacksonville", "Fort Worth", "El Paso", "Fresno", "Tulsa", "Wichita", "Boise", "Spokane", "Des Moines", "Little Rock", "Savannah", "Providence", "Hartford", "Reno", "Knoxville", "Chattanooga", "Baton Rouge", "Anaheim", "Oakland", "Fort Lauderdale", "Tallahassee", "Akron", "Dayton", "Pasadena", "Scottsdale", "Tacoma", "Boulder", "Ann Arbor", "Green Bay", "Duluth", "Fargo"],
    "Canada": ["Regina", "Saskatoon", "Kelowna", "Moncton", "Fredericton", "Charlottetown", "Mississauga", "Brampton", "Gatineau", "Thunder Bay", "Whitehorse", "Yellowknife", "Iqaluit"],
    "Japan": ["Kanazawa", "Okayama", "Kumamoto", "Kagoshima", "Matsuyama", "Naha", "Hakodate", "Shizuoka", "Niigata", "Hamamatsu", "Kitakyushu", "Nikko", "Takayama", "Kamakura", "Utsunomiya", "Aomori", "Akita", "Morioka"],
    "China": ["Qingdao", "Dalian", "Xiamen", "Kunming", "Shenyang", "Lhasa", "Changsha", "Zhengzhou", "Fuzhou", "Nanning", "Guiyang", "Hefei", "Jinan", "Taiyuan", "Lanzhou", "Urumqi", "Ningbo", "Wuxi", "Guilin", "Sanya"],
    "India": ["Kochi", "Surat", "Nagpur", "Indore", "Bhopal", "Patna", "Amritsar", "Mysore", "Chandigarh", "Coimbatore", "Thiruvananthapuram", "Visakhapatnam", "Vadodara", "Ludhiana", "Madurai", "Rajkot", "Ranchi", "Guwahati", "Dehradun", "Udaipur", "Jodhpur", "Shimla"],
    "Australia": ["Geelong", "Townsville", "Wollongong", "Ballarat", "Toowoomba", "Bendigo", "Alice Springs", "Fremantle", "Rockhampton"],
    "Italy": ["Perugia", "Parma", "Modena", "Bergamo", "Lecce", "Ravenna", "Cagliari", "Brescia", "Trento", "Bolzano", "Udine", "Ancona", "Pescara", "Salerno", "Messina", "Taranto", "Rimini", "Livorno", "Lucca", "Como", "Sorrento"],
    "France": ["Le Havre", "Rouen", "Tours", "Limoges", "Clermont-Ferrand", "Angers", "Caen", "Toulon", "Metz", "Nancy", "Orléans", "Poitiers", "Perpignan", "Besançon", "Ajaccio", "Le Mans", "Amiens", "Nîmes", "Aix-en-Provence", "Biarritz", "Annecy", "Chamonix"],
    "Germany": ["Mainz", "Augsburg", "Essen", "Kiel", "Lübeck", "Münster", "Potsdam", "Rostock", "Wiesbaden", "Karlsruhe", "Mannheim", "Bochum", "Wuppertal", "Bielefeld", "Erfurt", "Magdeburg", "Regensburg", "Würzburg", "Göttingen", "Aachen", "Braunschweig", "Chemnitz", "Saarbrücken", "Ulm", "Trier", "Jena"],
    "Spain": ["Santander", "San Sebastián", "Murcia", "Cádiz", "Valladolid", "Oviedo", "A Coruña", "Vigo", "Almería", "Gijón", "Tarragona", "Girona", "Burgos", "Logroño", "Huelva", "Jaén", "Marbella", "Benidorm", "Badajoz", "Cáceres", "Segovia", "Ávila"],
    "the United Kingdom": ["Brighton", "Southampton", "Leicester", "Coventry", "Swansea", "Dundee", "Inverness", "Norwich", "Exeter", "Sunderland", "Derby", "Stoke-on-Trent", "Portsmouth", "Bournemouth", "Blackpool", "Preston", "Wolverhampton", "Middlesbrough", "Kingston upon Hull", "Stirling"],
    "Romania": ["Brașov", "Sibiu"],
    "Croatia": ["Zadar", "Osijek"],
    "Serbia": ["Novi Sad", "Niš", "Kragujevac"],
    "Bulgaria": ["Plovdiv", "Varna", "Burgas"],
    "Slovakia": ["Košice", "Žilina"],
    "Lithuania": ["Kaunas", "Klaipėda"],
    "Estonia": ["Tartu", "Pärnu"],
    "Bangladesh": ["Chittagong", "Khulna", "Sylhet"],
    "Sri Lanka": ["Kandy", "Galle", "Jaffna"],
    "Ethiopia": ["Dire Dawa", "Gondar", "Bahir Dar"],
    "Ghana": ["Kumasi", "Tamale"],
    "Tanzania": ["Dar es Salaam", "Arusha", "Dodoma"],
    "Algeria": ["Oran", "Annaba"],
    "Tunisia": ["Sfax", "Sousse", "Kairouan"],
    "Cuba": ["Santiago de Cuba", "Camagüey"],
    "Venezuela": ["Maracaibo", "Barquisimeto"],
    "Bolivia": ["Santa Cruz de la Sierra", "Cochabamba", "Sucre"],
    "Kazakhstan": ["Almaty", "Astana", "Shymkent"],
    "Uzbekistan": ["Samarkand", "Bukhara", "Khiva"],
    "Iraq": ["Basra", "Mosul", "Erbil"],
    "Syria": ["Aleppo", "Homs", "Latakia"],
    "Jordan": ["Aqaba", "Irbid"],
    "the United Arab Emirates": ["Al Ain"],
    "Myanmar": ["Yangon", "Mandalay", "Naypyidaw"],
    "Cambodia": ["Siem Reap", "Battambang"],
}  # fmt: skip


def _invert(table: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(subject, object) pairs from {object: [subjects]}."""
    return [(s, o) for o, subjects in table.items() for s in subjects]


def pairs() -> dict[str, list[tuple[str, str]]]:
    """Every relation's (subject, true object) pairs, in the order written."""
    return {
        "country-capital": list(CAPITALS.items()),
        "city-country": _invert(CITIES),
        "landmark-city": _invert(LANDMARKS),
        "country-continent": _invert(CONTINENTS),
        "country-language": _invert(LANGUAGES),
        "country-currency": _invert(CURRENCIES),
        "company-city": _invert(COMPANY_CITIES),
        "club-city": _invert(CLUB_CITIES),
    }


def _prompt(template: str, phrase: str) -> str:
    text = template.format(phrase)
    return text[0].upper() + text[1:]  # "the United Kingdom is …" opens a sentence: "The …"


def _subject(phrase: str) -> str:
    """The subject as it occurs in every prompt: the phrase without a leading article."""
    return phrase.removeprefix("the ")


def _record(relation: str, phrase: str, true: str, rows: list[tuple[str, str]],
            rng: random.Random) -> dict:  # fmt: skip
    """The record of one pair; `rows`, every pair of the relation, give its neighbours and the
    objects its `new` is drawn from."""
    templates = TEMPLATES[relation]
    objects = sorted({o for _, o in rows})
    others = [p for p, o in rows if o == true and p != phrase]
    near = rng.sample(others, min(NEIGHBOURS, len(others)))
    return {
        "id": 0,  # numbered once shuffled
        "relation": relation,
        "subject": _subject(phrase),
        "prompt": _prompt(templates[0], phrase),
        "true": true,
        "new": rng.choice([o for o in objects if o != true]),
        "paraphrases": [_prompt(t, phrase) for t in templates[1:]],
        "neighbourhood": [_prompt(templates[0], p) for p in near],
        "generation": [_prompt("{} is", phrase)],
    }


def records(rng: random.Random) -> list[dict]:
    """One record per (subject, object) pair, in a seeded order, each with its split."""
    out = [_record(relation, phrase, true, rows, rng)
           for relation, rows in pairs().items() for phrase, true in rows]  # fmt: skip
    rng.shuffle(out)  # relations interleaved: the first facts of a split mix all eight
    for i, r in enumerate(out):
        r["id"] = i
        r["split"] = "train" if rng.random() < TRAIN_SHARE else "test"
    return out


def extra_records(rng: random.Random, start: int) -> list[dict]:
    """The `EXTRA_CITIES` records, all `test`, numbered from `start`; their neighbours and new
    objects come from every city → country pair, the first ones' included."""
    added = _invert(EXTRA_CITIES)
    rows = _invert(CITIES) + added
    subjects = [p for p, _ in rows]
    assert len(set(subjects)) == len(subjects), "a city is listed twice"
    out = [_record("city-country", phrase, true, rows, rng) for phrase, true in added]
    rng.shuffle(out)
    for i, r in enumerate(out, start):
        r["id"], r["split"] = i, "test"
    return out


def render() -> str:
    """The file's text: one JSON object per line."""
    rows = records(random.Random(SEED))
    rows += extra_records(random.Random(SEED + 1), len(rows))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the packaged file differs")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    text = render()
    if a.check:
        same = a.out.exists() and a.out.read_text() == text
        print(f"{a.out}: {'up to date' if same else 'stale'}")
        return 0 if same else 1
    a.out.write_text(text)
    rows = [json.loads(line) for line in text.splitlines()]
    train = sum(r["split"] == "train" for r in rows)
    print(f"{a.out}: {len(rows)} requests, {train} train / {len(rows) - train} test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
